package nodenet

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the node network reconciler's series.
type Metrics struct {
	routes   prometheus.Gauge
	skipped  prometheus.Gauge
	peers    prometheus.Gauge
	changes  *prometheus.CounterVec
	errors   *prometheus.CounterVec
	duration prometheus.Histogram
}

// NewMetrics creates the series; Register exposes them.
func NewMetrics() *Metrics {
	m := &Metrics{
		routes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "qoscni_nodenet_routes_installed",
			Help: "Routes to other nodes' pod CIDRs that qoscni has in the kernel after the last reconcile.",
		}),
		skipped: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "qoscni_nodenet_pod_cidrs_skipped",
			Help: "Pod CIDRs of other nodes left without a route at the last reconcile (peer not on-link, no InternalIP of the family, conflict); the agent logs why.",
		}),
		peers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "qoscni_nodenet_nodes",
			Help: "Node objects seen at the last reconcile, this node included.",
		}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "qoscni_nodenet_route_changes_total",
			Help: "Routes the reconciler changed, by operation (add, replace, delete). Adds without a node joining mean routes were removed behind qoscni's back.",
		}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "qoscni_nodenet_reconcile_errors_total",
			Help: "Failed steps of the node network reconciler, by step (routes, masq, annotate: publishing the VTEP MAC).",
		}, []string{"step"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "qoscni_nodenet_reconcile_duration_seconds",
			Help:    "Time one reconcile of the routes to other nodes (and the ipMasq cluster CIDRs) took.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}),
	}
	for _, op := range []string{"add", "replace", "delete"} {
		m.changes.WithLabelValues(op)
	}
	for _, s := range []string{"routes", "masq", "annotate"} {
		m.errors.WithLabelValues(s)
	}
	return m
}

// Register adds the series to reg.
func (m *Metrics) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.routes, m.skipped, m.peers, m.changes, m.errors, m.duration} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
