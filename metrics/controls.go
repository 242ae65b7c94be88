package metrics

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/state"
)

// The per-pod controls kept in nftables (packages controls).
var (
	ifLabels     = []string{"namespace", "pod", "interface"}
	descCRate    = newDesc("qoscni_control_packet_rate_limit_packets_per_second", "Configured packet rate of the direction (its packet-rate annotation).", dirLabels)
	descCBurst   = newDesc("qoscni_control_packet_burst_packets", "Configured packet burst of the direction's packet rate.", dirLabels)
	descCConns   = newDesc("qoscni_control_max_connections", "Configured bound on the connections open at once: opened by the pod (egress) or to it (ingress).", dirLabels)
	descCDSCP    = newDesc("qoscni_control_dscp", "DSCP code point written into every packet the pod sends.", ifLabels)
	descCUp      = newDesc("qoscni_control_up", "1 when the control's nftables elements were found for every pod address at this scrape, else 0 (control packet-rate, connections, or dscp with direction egress).", append(slices.Clone(dirLabels), "control"))
	descCOffered = newDesc("qoscni_control_offered_packets_total", "Packets of the direction its packet rate met, passed and dropped.", dirLabels)
	descCDropped = newDesc("qoscni_control_dropped_packets_total", "Packets dropped because the direction was over its packet rate.", dirLabels)
	descCRefused = newDesc("qoscni_control_refused_connections_total", "New connections refused because the direction had its maximum open.", dirLabels)
	descCFlow    = newDesc("qoscni_control_bypassing_flowtables", "nftables flowtables in the node's namespace, exported while a pod on it has packet-rate, connection or DSCP controls: flows offloaded to a flowtable skip them.", nil)
	controlDescs = []desc{descCRate, descCBurst, descCConns, descCDSCP, descCUp, descCOffered, descCDropped, descCRefused, descCFlow}
)

// controlKey is one counter of one counted control of one attachment
// (offered: the packets a packet rate met, else its drops or refusals).
type controlKey struct {
	key     state.Key
	kind    controls.Kind
	offered bool
}

// resetting keeps a counter monotonic across its element being replaced
// (a reshape sets the pod's elements anew, and their counters with them).
type resetting struct{ last, offset uint64 }

func (r *resetting) update(now uint64) uint64 {
	if now < r.last {
		r.offset += r.last
	}
	r.last = now
	return r.offset + now
}

// collectControls exports the controls of the attachments that have any,
// reading their counters from nftables (one exact-key lookup per control
// and address).
func (c *Collector) collectControls(ch chan<- prometheus.Metric, atts []Attachment) {
	gauge := func(d desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d.Desc, prometheus.GaugeValue, v, l...)
	}
	var m *controls.Manager
	defer func() {
		if m != nil {
			m.Close()
		}
	}()
	seen := map[controlKey]bool{}
	counter := func(d desc, ck controlKey, now uint64, l []string) {
		seen[ck] = true
		r := c.controlCounts[ck]
		if r == nil {
			r = &resetting{}
			c.controlCounts[ck] = r
		}
		ch <- prometheus.MustNewConstMetric(d.Desc, prometheus.CounterValue, float64(r.update(now)), l...)
	}
	for i := range atts {
		a := &atts[i]
		ctl := a.Record.Controls
		if ctl.Empty() {
			continue
		}
		if m == nil {
			var err error
			if m, err = controls.New(c.cfg.Netns.shapingFd()); err != nil {
				c.errors.WithLabelValues("nftables").Inc()
				c.log.Warn("read controls", "err", err)
				return
			}
			// The plugin refuses controls on a node with a flowtable;
			// this shows one made after the pods got theirs.
			if fts, err := m.Raw.Flowtables(); err != nil {
				c.errors.WithLabelValues("nftables").Inc()
				c.log.Warn("list nftables flowtables", "err", err)
			} else {
				gauge(descCFlow, float64(len(fts)))
			}
		}
		ips, err := controls.IPsOf(a.Record)
		if err != nil {
			c.errors.WithLabelValues("state").Inc()
			continue
		}
		got, err := m.Read(ips)
		if err != nil {
			c.errors.WithLabelValues("nftables").Inc()
			c.log.Warn("read controls", "namespace", a.Namespace, "pod", a.Pod, "err", err)
			continue
		}
		if ctl.DSCP != nil {
			gauge(descCDSCP, float64(*ctl.DSCP), a.Namespace, a.Pod, a.Interface)
			up := 0.0
			if got.DSCP {
				up = 1
			}
			gauge(descCUp, up, a.Namespace, a.Pod, a.Interface, "egress", "dscp")
		}
		for _, k := range controls.Kinds() {
			d := ctl.Ingress
			if k.Direction() == "egress" {
				d = ctl.Egress
			}
			if d == nil {
				continue
			}
			l := []string{a.Namespace, a.Pod, a.Interface, k.Direction()}
			count, total := descCDropped, d.PacketRate != 0
			if k.Control() == "connections" {
				count, total = descCRefused, d.MaxConnections != 0
				if total {
					gauge(descCConns, float64(d.MaxConnections), l...)
				}
			} else if total {
				gauge(descCRate, float64(d.PacketRate), l...)
				gauge(descCBurst, float64(d.PacketBurst), l...)
			}
			if !total {
				continue
			}
			up := 0.0
			if got.Present[k] {
				up = 1
			}
			gauge(descCUp, up, append(slices.Clone(l), k.Control())...)
			counter(count, controlKey{a.Record.Key(), k, false}, got.Count[k], l)
			if k.Control() == "packet-rate" {
				counter(descCOffered, controlKey{a.Record.Key(), k, true}, got.Offered[k], l)
			}
		}
	}
	for k := range c.controlCounts {
		if !seen[k] {
			delete(c.controlCounts, k)
		}
	}
}
