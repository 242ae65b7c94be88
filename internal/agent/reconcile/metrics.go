package reconcile

import "github.com/prometheus/client_golang/prometheus"

// The reconciler's metric names.
const (
	nameReshapes = "qoscni_agent_reshapes_total"
	nameRepairs  = "qoscni_agent_repairs_total"
	nameGC       = "qoscni_agent_gc_total"
	nameErrors   = "qoscni_agent_reconcile_errors_total"
	namePass     = "qoscni_agent_reconcile_pass_duration_seconds"
)

// MetricNames lists the series names the reconciler's metrics export (a
// histogram's _bucket, _sum and _count), for checks of the alert rules and
// the dashboard.
func MetricNames() []string {
	return []string{nameReshapes, nameRepairs, nameGC, nameErrors, namePass + "_bucket", namePass + "_sum", namePass + "_count"}
}

// Metrics are the reconciler's counters, registered by the agent.
type Metrics struct {
	reshapes     *prometheus.CounterVec
	repairs      *prometheus.CounterVec
	gc           *prometheus.CounterVec
	errors       *prometheus.CounterVec
	passDuration prometheus.Histogram
}

// NewMetrics creates the counters; Register exposes them.
func NewMetrics() *Metrics {
	m := &Metrics{
		reshapes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: nameReshapes,
			Help: "Attachments reshaped after a pod's bandwidth annotations changed, by result (applied, invalid = bad annotation value kept the old shaping, failed).",
		}, []string{"result"}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: nameRepairs,
			Help: "Kernel state that had drifted from the records and was restored, by kind: shaping counts attachments; nftables-base counts rebuilds of a feature's chains and rules in table inet qoscni; hostport and masquerade count set elements; localnet-guard counts tc guards of route_localnet.",
		}, []string{"kind"}),
		gc: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: nameGC,
			Help: "Objects removed by the agent's garbage collection, by kind (attachment = a stale attachment with everything it held; veth, ifb = leftover links without a record; other kinds are cleanup steps such as portmap).",
		}, []string{"kind"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: nameErrors,
			Help: "Errors of the agent's reconciler, by operation (list, reshape, repair, gc).",
		}, []string{"op"}),
		passDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    namePass,
			Help:    "Time a full reconcile pass (GC, annotation check and drift repair of every attachment) took.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
	}
	// Series that exist from the start, so rate() works from the first scrape.
	m.repairs.WithLabelValues("shaping")
	for _, k := range []string{"attachment", "veth", "ifb"} {
		m.gc.WithLabelValues(k)
	}
	for _, k := range []string{"applied", "invalid", "failed"} {
		m.reshapes.WithLabelValues(k)
	}
	return m
}

// Register adds the metrics to reg.
func (m *Metrics) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.reshapes, m.repairs, m.gc, m.errors, m.passDuration} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
