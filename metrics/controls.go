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
	descCUp      = newDesc("qoscni_control_up", "1 when the control's nftables element was found at this scrape, else 0.", append(slices.Clone(dirLabels), "control"))
	descCDropped = newDesc("qoscni_control_dropped_packets_total", "Packets dropped because the direction was over its packet rate.", dirLabels)
	descCRefused = newDesc("qoscni_control_refused_connections_total", "New connections refused because the direction had its maximum open.", dirLabels)
	controlDescs = []desc{descCRate, descCBurst, descCConns, descCDSCP, descCUp, descCDropped, descCRefused}
)

// controlKey is one counted control of one attachment.
type controlKey struct {
	key  state.Key
	kind controls.Kind
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
	for i := range atts {
		a := &atts[i]
		ctl := a.Record.Controls
		if ctl.Empty() {
			continue
		}
		if ctl.DSCP != nil {
			gauge(descCDSCP, float64(*ctl.DSCP), a.Namespace, a.Pod, a.Interface)
		}
		if m == nil {
			var err error
			if m, err = controls.New(c.cfg.Netns.shapingFd()); err != nil {
				c.errors.WithLabelValues("nftables").Inc()
				c.log.Warn("read controls", "err", err)
				return
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
			ck := controlKey{a.Record.Key(), k}
			seen[ck] = true
			r := c.controlCounts[ck]
			if r == nil {
				r = &resetting{}
				c.controlCounts[ck] = r
			}
			ch <- prometheus.MustNewConstMetric(count.Desc, prometheus.CounterValue, float64(r.update(got.Count[k])), l...)
		}
	}
	for k := range c.controlCounts {
		if !seen[k] {
			delete(c.controlCounts, k)
		}
	}
}
