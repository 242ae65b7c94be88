// Package kubectl is what `kubectl qoscni` runs: the per-pod shaping of a
// cluster read through the API server, from the agents' metrics (through
// the API server's pod proxy, so no node port has to be reachable from
// where kubectl runs) and from the pods' effective-shaping annotation and
// Events.
package kubectl

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// AgentLabel selects the agents' pods (deploy/base/daemonset.yaml).
const AgentLabel = "app.kubernetes.io/name=qoscni-agent"

// Cluster reads the agents of one cluster.
type Cluster struct {
	Client kubernetes.Interface
	// AgentNamespace holds the agents' DaemonSet (default "qoscni").
	AgentNamespace string
	// Port is the agents' metrics port (default 9742).
	Port int
}

func (c *Cluster) ns() string {
	if c.AgentNamespace == "" {
		return "qoscni"
	}
	return c.AgentNamespace
}

func (c *Cluster) port() string {
	if c.Port == 0 {
		return "9742"
	}
	return fmt.Sprint(c.Port)
}

// agents maps node name to its agent pod, running ones only.
func (c *Cluster) agents(ctx context.Context) (map[string]string, error) {
	l, err := c.Client.CoreV1().Pods(c.ns()).List(ctx, metav1.ListOptions{LabelSelector: AgentLabel})
	if err != nil {
		return nil, fmt.Errorf("list qoscni agents in namespace %s: %w", c.ns(), err)
	}
	out := map[string]string{}
	for _, p := range l.Items {
		if p.Status.Phase == corev1.PodRunning && p.Spec.NodeName != "" {
			out[p.Spec.NodeName] = p.Name
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no running qoscni agent in namespace %s (label %s)", c.ns(), AgentLabel)
	}
	return out, nil
}

// Series is one pod direction as its node's agent exports it.
type Series struct {
	Node, Namespace, Pod, Interface, Direction string
	// LimitBits and RequestBits are the limit and guaranteed rate in
	// bit/s (0: none).
	LimitBits, RequestBits float64
	// SentBytes and Dropped are counters: the shaper's, else the
	// guarantee class's; ControlDrops are the packet-rate drops.
	SentBytes, Dropped, ControlDrops float64
	// InKernel is false when the agent did not find the direction's qdisc
	// or class.
	InKernel bool
}

// Key orders and joins series.
func (s Series) Key() string {
	return strings.Join([]string{s.Node, s.Namespace, s.Pod, s.Interface, s.Direction}, "/")
}

// scrape reads one node's agent through the API server's pod proxy.
func (c *Cluster) scrape(ctx context.Context, node, agent string) ([]Series, error) {
	raw, err := c.Client.CoreV1().Pods(c.ns()).ProxyGet("http", agent, c.port(), "/metrics", nil).DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("metrics of the agent on %s (pod %s): %w", node, agent, err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("metrics of the agent on %s: %w", node, err)
	}
	byKey := map[string]*Series{}
	get := func(m *dto.Metric) *Series {
		l := map[string]string{}
		for _, p := range m.GetLabel() {
			l[p.GetName()] = p.GetValue()
		}
		s := Series{Node: node, Namespace: l["namespace"], Pod: l["pod"], Interface: l["interface"], Direction: l["direction"]}
		k := s.Key()
		if byKey[k] == nil {
			byKey[k] = &s
		}
		return byKey[k]
	}
	val := func(m *dto.Metric) float64 {
		if m.GetCounter() != nil {
			return m.GetCounter().GetValue()
		}
		return m.GetGauge().GetValue()
	}
	for name, set := range map[string]func(*Series, float64){
		"qoscni_shaping_rate_limit_bytes_per_second": func(s *Series, v float64) { s.LimitBits = v * 8 },
		"qoscni_guarantee_request_bytes_per_second":  func(s *Series, v float64) { s.RequestBits = v * 8 },
		"qoscni_shaping_sent_bytes_total":            func(s *Series, v float64) { s.SentBytes = v },
		"qoscni_shaping_dropped_packets_total":       func(s *Series, v float64) { s.Dropped = v },
		"qoscni_shaping_qdisc_up":                    func(s *Series, v float64) { s.InKernel = v == 1 },
		"qoscni_control_dropped_packets_total":       func(s *Series, v float64) { s.ControlDrops = v },
	} {
		for _, m := range fams[name].GetMetric() {
			set(get(m), val(m))
		}
	}
	// A guaranteed direction has no pipeline of its own: its class's
	// counters stand in.
	for _, name := range []string{"qoscni_guarantee_sent_bytes_total", "qoscni_guarantee_dropped_packets_total", "qoscni_guarantee_class_up"} {
		for _, m := range fams[name].GetMetric() {
			s := get(m)
			switch name {
			case "qoscni_guarantee_sent_bytes_total":
				if s.SentBytes == 0 {
					s.SentBytes = val(m)
				}
			case "qoscni_guarantee_dropped_packets_total":
				s.Dropped += val(m)
			default:
				s.InKernel = s.InKernel || val(m) == 1
			}
		}
	}
	out := make([]Series, 0, len(byKey))
	for _, s := range byKey {
		out = append(out, *s)
	}
	return out, nil
}

// Scrape reads every node's agent; a node whose agent does not answer is
// reported in errs and left out.
func (c *Cluster) Scrape(ctx context.Context) (series []Series, errs []error, err error) {
	agents, err := c.agents(ctx)
	if err != nil {
		return nil, nil, err
	}
	nodes := make([]string, 0, len(agents))
	for n := range agents {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	for _, n := range nodes {
		s, err := c.scrape(ctx, n, agents[n])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		series = append(series, s...)
	}
	sort.Slice(series, func(i, j int) bool { return series[i].Key() < series[j].Key() })
	return series, errs, nil
}

// Rate is a series with its throughput over a window.
type Rate struct {
	Series
	Bits, Drops float64 // per second
}

// Rates scrapes twice, window apart, and returns each series' rates.
func (c *Cluster) Rates(ctx context.Context, window time.Duration) ([]Rate, []error, error) {
	first, _, err := c.Scrape(ctx)
	if err != nil {
		return nil, nil, err
	}
	start := time.Now()
	select {
	case <-time.After(window):
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	second, errs, err := c.Scrape(ctx)
	if err != nil {
		return nil, nil, err
	}
	secs := time.Since(start).Seconds()
	before := map[string]Series{}
	for _, s := range first {
		before[s.Key()] = s
	}
	out := make([]Rate, 0, len(second))
	for _, s := range second {
		r := Rate{Series: s}
		if b, ok := before[s.Key()]; ok && s.SentBytes >= b.SentBytes {
			r.Bits = (s.SentBytes - b.SentBytes) * 8 / secs
			r.Drops = (s.Dropped + s.ControlDrops - b.Dropped - b.ControlDrops) / secs
		}
		out = append(out, r)
	}
	return out, errs, nil
}
