package metrics

import (
	"log/slog"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/journal"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// Config says where the collector reads from.
type Config struct {
	StateDir   string // plugin attachment records
	JournalDir string // plugin call journal ("" = do not read)
	CNIConfDir string // conflists naming qoscni networks with built-in IPAM or a stateDir ("" = none)
	Netns      *Netns // namespace of the node's devices
	Version    string // qoscni_build_info version label
	Logger     *slog.Logger

	// StateRegistry lists more state directories ("" = none). The records
	// are those of StateDir, of the stateDir of every qoscni network of
	// CNIConfDir and of the registered directories
	// (cniconf.StateSources, as the reconciler reads them).
	StateRegistry string
}

// OpDurationBuckets cover a CNI call: a fast DEL takes about a millisecond, an
// ADD that waits for the IPAM lock or a slow runtime seconds.
var OpDurationBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// desc describes series the collector makes itself. Its name is kept as
// data beside the prometheus.Desc, which does not expose it: Names needs it.
type desc struct {
	name string
	*prometheus.Desc
}

func newDesc(name, help string, labels []string) desc {
	return desc{name, prometheus.NewDesc(name, help, labels, nil)}
}

// Names of the families the collector's vectors export.
const (
	nameOps        = "qoscni_cni_operations_total"
	nameOpDuration = "qoscni_cni_operation_duration_seconds"
	nameJournalBad = "qoscni_journal_bad_records_total"
	nameErrors     = "qoscni_agent_collect_errors_total"
)

var (
	dirLabels = []string{"namespace", "pod", "interface", "direction"}

	descLimit     = newDesc("qoscni_shaping_rate_limit_bytes_per_second", "Configured shaping rate of the direction (the bandwidth annotation / 8).", dirLabels)
	descBurst     = newDesc("qoscni_shaping_burst_bytes", "Configured token bucket depth.", dirLabels)
	descQLimit    = newDesc("qoscni_shaping_queue_limit_bytes", "Bytes the shaper may queue before dropping.", dirLabels)
	descDelay     = newDesc("qoscni_shaping_queue_delay_budget_seconds", "Queueing delay budget the queue limit was derived from.", dirLabels)
	descUp        = newDesc("qoscni_shaping_qdisc_up", "1 when the direction's root qdisc was found in the kernel at this scrape, else 0.", dirLabels)
	descBytes     = newDesc("qoscni_shaping_sent_bytes_total", "Bytes sent through the shaper (layer 2 size).", dirLabels)
	descPackets   = newDesc("qoscni_shaping_sent_packets_total", "Packets sent through the shaper.", dirLabels)
	descDrops     = newDesc("qoscni_shaping_dropped_packets_total", "Packets the shaper dropped (queue full).", dirLabels)
	descOverlimit = newDesc("qoscni_shaping_overlimits_total", "Times the shaper throttled because the rate limit was reached.", dirLabels)
	descRequeues  = newDesc("qoscni_shaping_requeues_total", "Packets requeued by the shaper because the device was busy.", dirLabels)
	descBacklogB  = newDesc("qoscni_shaping_backlog_bytes", "Bytes queued in the shaper now.", dirLabels)
	descBacklogP  = newDesc("qoscni_shaping_backlog_packets", "Packets queued in the shaper now.", dirLabels)

	descClamped = newDesc("qoscni_shaping_clamped_requested",
		"A setting the pod asked above the config's ceiling, with the value it asked for (seconds for queue_delay, bytes for burst and queue_limit); the kernel got the ceiling. No series: nothing clamped.",
		append(slices.Clone(dirLabels), "setting"))

	// The pod's class in the node's guaranteed-bandwidth hierarchy.
	descGRequest    = newDesc("qoscni_guarantee_request_bytes_per_second", "Guaranteed rate of the pod's class in the node hierarchy (its bandwidth request / 8); 0 for a best-effort pod.", dirLabels)
	descGLimit      = newDesc("qoscni_guarantee_limit_bytes_per_second", "Most the pod's class may reach by borrowing (its limit, else the node capacity, / 8).", dirLabels)
	descGPriority   = newDesc("qoscni_guarantee_priority", "The pod's borrowing priority in the label priority (high, normal, low); always 1.", append(slices.Clone(dirLabels), "priority"))
	descGUp         = newDesc("qoscni_guarantee_class_up", "1 when the pod's class was found in the node hierarchy at this scrape, else 0.", dirLabels)
	descGBytes      = newDesc("qoscni_guarantee_sent_bytes_total", "Bytes the pod's class in the node hierarchy sent (layer 2 size).", dirLabels)
	descGPackets    = newDesc("qoscni_guarantee_sent_packets_total", "Packets the pod's class in the node hierarchy sent.", dirLabels)
	descGDrops      = newDesc("qoscni_guarantee_dropped_packets_total", "Packets the pod's class dropped (its queue was full); where its leaf cuts GSO packets (requests under about 100 Mbit/s), frames.", dirLabels)
	descGOverlimits = newDesc("qoscni_guarantee_overlimits_total", "Times the pod's class reached its limit (HTB ceil) and had to wait.", dirLabels)
	descGLends      = newDesc("qoscni_guarantee_htb_lends_total", "Packets the pod's class sent within its guaranteed rate: HTB's lends count of a leaf class. A count of dequeues, not bytes (a GSO packet of up to 64 KiB counts once, so it is below sent_packets_total).", dirLabels)
	descGBorrows    = newDesc("qoscni_guarantee_htb_borrows_total", "Packets the pod's class sent above its guaranteed rate, on capacity borrowed from its parent: HTB's borrows count. A count of dequeues, not bytes (HTB counts no borrowed bytes; a GSO packet counts once).", dirLabels)
	descGBacklog    = newDesc("qoscni_guarantee_backlog_bytes", "Bytes queued in the pod's class now.", dirLabels)

	nodeLabels    = []string{"direction"}
	descNCapacity = newDesc("qoscni_guarantee_node_capacity_bytes_per_second", "Capacity of the node's guaranteed-bandwidth hierarchy in the direction (its class 1:1).", nodeLabels)
	descNRequests = newDesc("qoscni_guarantee_node_requests_bytes_per_second", "Sum of the requests of the pods in the direction's hierarchy, as the kernel has them.", nodeLabels)
	descNHeadroom = newDesc("qoscni_guarantee_node_headroom_bytes_per_second", "Capacity minus the sum of requests: what a new request can still get; negative when the capacity was lowered below what pods hold.", nodeLabels)

	descInfo = newDesc("qoscni_attachment_info", "One series per exported attachment, carrying its identifiers (not on the hot series).",
		[]string{"namespace", "pod", "interface", "network", "container_id", "host_veth", "ifb", "mode"})
	descPorts  = newDesc("qoscni_pod_hostports", "hostPort mappings held by the pod.", []string{"namespace", "pod"})
	descHidden = newDesc("qoscni_state_duplicate_attachments", "Attachment records not exported because another record has the same namespace/pod/interface.", nil)
	descBad    = newDesc("qoscni_state_bad_records", "Attachment record files that could not be decoded.", nil)

	ipamLabels   = []string{"network", "range_set", "subnets"}
	descIPAMCap  = newDesc("qoscni_ipam_addresses_capacity", "Allocatable addresses of the range set.", ipamLabels)
	descIPAMUsed = newDesc("qoscni_ipam_addresses_used", "Reserved addresses of the range set.", ipamLabels)

	descBuild   = newDesc("qoscni_build_info", "Build of the agent; always 1.", []string{"version", "revision", "goversion"})
	descCollect = newDesc("qoscni_agent_collect_duration_seconds", "Time the previous collection of qoscni metrics took.", nil)

	// ownDescs is every desc above, in the order Describe sends them.
	ownDescs = append([]desc{descLimit, descBurst, descQLimit, descDelay, descClamped, descUp, descBytes, descPackets,
		descDrops, descOverlimit, descRequeues, descBacklogB, descBacklogP,
		descGRequest, descGLimit, descGPriority, descGUp, descGBytes, descGPackets, descGDrops, descGOverlimits,
		descGLends, descGBorrows, descGBacklog, descNCapacity, descNRequests, descNHeadroom,
		descInfo, descPorts, descHidden, descBad, descIPAMCap, descIPAMUsed, descBuild, descCollect},
		controlDescs...)
)

// counter indexes into a series' five counters.
const (
	cBytes = iota
	cPackets
	cDrops
	cOverlimits
	cRequeues
	nCounters
)

type seriesKey struct {
	key state.Key
	dir string
}

// monotonic keeps one direction's exported counters monotonic across a
// kernel reset (qdisc deleted and recreated) while the attachment lives.
type monotonic struct {
	kind   string
	handle uint32
	last   [nCounters]uint64
	offset [nCounters]uint64
}

func raw(s *QdiscStats) [nCounters]uint64 {
	return [nCounters]uint64{s.Bytes, s.Packets, uint64(s.Drops), uint64(s.Overlimits), uint64(s.Requeues)}
}

// update folds a new kernel reading in and returns the exported values.
func (m *monotonic) update(s *QdiscStats) [nCounters]uint64 {
	now := raw(s)
	reset := s.Kind != m.kind || s.Handle != m.handle || now[cBytes] < m.last[cBytes] || now[cPackets] < m.last[cPackets]
	for i := range now {
		switch {
		case reset:
			m.offset[i] += m.last[i]
		case now[i] < m.last[i]:
			// Drops, overlimits and requeues are 32-bit in the kernel's
			// gnet_stats_queue; bytes and packets going on means a wrap.
			m.offset[i] += 1 << 32
		}
	}
	m.kind, m.handle, m.last = s.Kind, s.Handle, now
	var out [nCounters]uint64
	for i := range now {
		out[i] = m.offset[i] + now[i]
	}
	return out
}

// A class counter indexes into a hierarchy class's six counters.
const (
	gBytes = iota
	gPackets
	gDrops
	gOverlimits
	gLends
	gBorrows
	nClassCounters
)

// classMonotonic keeps a pod class's exported counters monotonic across
// the class being made again (a pod gaining or losing its request moves
// it) and the kernel's 32-bit counts wrapping: every count but bytes is
// 32 bits in the TCA_STATS and TCA_XSTATS the class is read from.
//
// A rejoin that swaps the class's leaf between a FIFO and a cutting TBF
// keeps the class but changes where its drops are counted (HTB's or the
// TBF's, which starts at 0): only the drop count restarts then.
type classMonotonic struct {
	guaranteed bool
	cut        bool
	last       [nClassCounters]uint64
	offset     [nClassCounters]uint64
}

func classRaw(c *shaping.HierClass) [nClassCounters]uint64 {
	s := c.Stats
	return [nClassCounters]uint64{s.Bytes, uint64(s.Packets), uint64(s.Drops), uint64(s.Overlimits), uint64(s.Lends), uint64(s.Borrows)}
}

// update folds a new kernel reading in and returns the exported values.
func (m *classMonotonic) update(c *shaping.HierClass) [nClassCounters]uint64 {
	now := classRaw(c)
	reset := c.Guaranteed != m.guaranteed || now[gBytes] < m.last[gBytes]
	if !reset && c.Cut != m.cut {
		m.offset[gDrops] += m.last[gDrops]
		m.last[gDrops] = 0
	}
	for i := range now {
		switch {
		case reset:
			m.offset[i] += m.last[i]
		case now[i] < m.last[i]:
			m.offset[i] += 1 << 32
		}
	}
	m.guaranteed, m.cut, m.last = c.Guaranteed, c.Cut, now
	var out [nClassCounters]uint64
	for i := range now {
		out[i] = m.offset[i] + now[i]
	}
	return out
}

// Collector is the agent's prometheus.Collector: everything is read at
// scrape time.
type Collector struct {
	cfg   Config
	store *NodeRecords
	log   *slog.Logger

	mu      sync.Mutex // one collection at a time: counters and journal offsets
	series  map[seriesKey]*monotonic
	classes map[seriesKey]*classMonotonic
	// controlCounts keep the control counters monotonic.
	controlCounts map[controlKey]*resetting
	lastTook      time.Duration

	ops        *prometheus.CounterVec
	opDuration *prometheus.HistogramVec
	journalBad prometheus.Counter
	errors     *prometheus.CounterVec
	build      prometheus.Metric
}

// NewCollector builds the collector; nothing is read until the first scrape.
func NewCollector(cfg Config) *Collector {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	revision := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				revision = s.Value
			}
		}
	}
	version := cfg.Version
	if version == "" {
		version = "dev"
	}
	c := &Collector{
		cfg:           cfg,
		store:         NewNodeRecords(cniconf.StateSources{Own: cfg.StateDir, ConfDir: cfg.CNIConfDir, Registry: cfg.StateRegistry}),
		log:           cfg.Logger,
		series:        map[seriesKey]*monotonic{},
		classes:       map[seriesKey]*classMonotonic{},
		controlCounts: map[controlKey]*resetting{},
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: nameOps,
			Help: "CNI plugin calls by command and result (code 0 = success, else the CNI error code; 999 = not a CNI error).",
		}, []string{"command", "network", "result", "code"}),
		opDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    nameOpDuration,
			Help:    "Duration of CNI plugin calls, from the plugin's own clock (excludes process start).",
			Buckets: OpDurationBuckets,
		}, []string{"command", "network", "result"}),
		journalBad: prometheus.NewCounter(prometheus.CounterOpts{
			Name: nameJournalBad,
			Help: "Journal lines that could not be parsed.",
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: nameErrors,
			Help: "Failed reads during collection, by source (state, tc, journal, ipam, nftables).",
		}, []string{"source"}),
		build: prometheus.MustNewConstMetric(descBuild.Desc, prometheus.GaugeValue, 1, version, revision, runtime.Version()),
	}
	for _, s := range []string{"state", "tc", "journal", "ipam", "nftables"} {
		c.errors.WithLabelValues(s) // exported from the start, so rate() works on the first error
	}
	return c
}

// Describe sends the static descriptors.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range ownDescs {
		ch <- d.Desc
	}
	c.ops.Describe(ch)
	c.opDuration.Describe(ch)
	c.journalBad.Describe(ch)
	c.errors.Describe(ch)
}

// Collect reads everything once and sends it.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	start := time.Now()

	c.drainJournal()
	c.collectAttachments(ch)
	c.collectIPAM(ch)

	c.ops.Collect(ch)
	c.opDuration.Collect(ch)
	c.journalBad.Collect(ch)
	c.errors.Collect(ch)
	ch <- c.build
	ch <- prometheus.MustNewConstMetric(descCollect.Desc, prometheus.GaugeValue, c.lastTook.Seconds())
	c.lastTook = time.Since(start)
}

func (c *Collector) drainJournal() {
	if c.cfg.JournalDir == "" {
		return
	}
	recs, bad, err := journal.Drain(c.cfg.JournalDir)
	if err != nil {
		c.errors.WithLabelValues("journal").Inc()
		c.log.Warn("drain journal", "dir", c.cfg.JournalDir, "err", err)
	}
	c.journalBad.Add(float64(bad))
	for _, r := range recs {
		result := "success"
		if !r.OK() {
			result = "error"
		}
		c.ops.WithLabelValues(r.Command, r.Network, result, strconv.Itoa(r.Code)).Inc()
		c.opDuration.WithLabelValues(r.Command, r.Network, result).Observe(r.Duration.Seconds())
	}
}

func (c *Collector) collectAttachments(ch chan<- prometheus.Metric) {
	snap, err := Take(c.store, c.cfg.Netns)
	if err != nil {
		c.errors.WithLabelValues("state").Inc()
		c.log.Warn("read attachments", "err", err)
		// Keep the counter offsets: a failed read is not a pod going away.
		return
	}
	if snap.HierarchyErr != nil {
		c.errors.WithLabelValues("tc").Inc()
		c.log.Warn("read the node hierarchy", "err", snap.HierarchyErr)
	}
	gauge := func(d desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d.Desc, prometheus.GaugeValue, v, l...)
	}
	counter := func(d desc, v uint64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d.Desc, prometheus.CounterValue, float64(v), l...)
	}
	for _, h := range snap.Hierarchy {
		gauge(descNCapacity, float64(h.CapacityBytes), h.Direction)
		gauge(descNRequests, float64(h.ReservedBytes), h.Direction)
		gauge(descNHeadroom, h.HeadroomBytes(), h.Direction)
	}
	seen := make(map[seriesKey]bool, 2*len(snap.Attachments))
	seenClass := make(map[seriesKey]bool, 2*len(snap.Attachments))
	ports := map[[2]string]int{}
	for i := range snap.Attachments {
		a := &snap.Attachments[i]
		r := a.Record
		ifb := ""
		if r.Shaping != nil {
			ifb = r.Shaping.IFB
		}
		gauge(descInfo, 1, a.Namespace, a.Pod, a.Interface, r.Network, r.ContainerID, r.HostVeth, ifb, string(r.Mode))
		ports[[2]string{a.Namespace, a.Pod}] += len(r.Ports)
		for _, d := range a.Dirs {
			l := []string{a.Namespace, a.Pod, a.Interface, d.Direction}
			gauge(descLimit, float64(d.Config.RateBits)/8, l...)
			gauge(descBurst, float64(d.Config.BurstBits)/8, l...)
			gauge(descQLimit, float64(d.Config.LimitBytes), l...)
			gauge(descDelay, float64(d.Config.MaxQueueDelayNs)/1e9, l...)
			for _, cl := range d.Config.Clamped {
				v := float64(cl.Requested)
				if cl.Setting == state.ClampQueueDelay {
					v /= 1e9
				}
				gauge(descClamped, v, append(slices.Clone(l), cl.Setting)...)
			}
			if d.Stats == nil {
				gauge(descUp, 0, l...)
				continue
			}
			gauge(descUp, 1, l...)
			k := seriesKey{r.Key(), d.Direction}
			seen[k] = true
			m := c.series[k]
			if m == nil {
				// First sight: the kernel's counts since the qdisc was made.
				m = &monotonic{kind: d.Stats.Kind, handle: d.Stats.Handle}
				c.series[k] = m
			}
			v := m.update(d.Stats)
			counter(descBytes, v[cBytes], l...)
			counter(descPackets, v[cPackets], l...)
			counter(descDrops, v[cDrops], l...)
			counter(descOverlimit, v[cOverlimits], l...)
			counter(descRequeues, v[cRequeues], l...)
			gauge(descBacklogB, float64(d.Stats.Backlog), l...)
			gauge(descBacklogP, float64(d.Stats.Qlen), l...)
		}
		for _, g := range a.Guarantees {
			l := []string{a.Namespace, a.Pod, a.Interface, g.Direction}
			gauge(descGRequest, float64(g.Config.RequestBits)/8, l...)
			gauge(descGLimit, float64(g.Config.CeilBits)/8, l...)
			gauge(descGPriority, 1, append(slices.Clone(l), g.Config.Priority)...)
			if g.Class == nil {
				gauge(descGUp, 0, l...)
				continue
			}
			gauge(descGUp, 1, l...)
			k := seriesKey{r.Key(), g.Direction}
			seenClass[k] = true
			m := c.classes[k]
			if m == nil {
				m = &classMonotonic{guaranteed: g.Class.Guaranteed}
				c.classes[k] = m
			}
			v := m.update(g.Class)
			counter(descGBytes, v[gBytes], l...)
			counter(descGPackets, v[gPackets], l...)
			counter(descGDrops, v[gDrops], l...)
			counter(descGOverlimits, v[gOverlimits], l...)
			counter(descGLends, v[gLends], l...)
			counter(descGBorrows, v[gBorrows], l...)
			gauge(descGBacklog, float64(g.Class.Stats.Backlog), l...)
		}
	}
	for p, n := range ports {
		gauge(descPorts, float64(n), p[0], p[1])
	}
	c.collectControls(ch, snap.Attachments)
	gauge(descHidden, float64(len(snap.Hidden)))
	gauge(descBad, float64(len(snap.Bad)))
	// Forget the offsets of attachments that are gone or lost their qdisc
	// record; a qdisc missing for one scrape keeps its state (its record is
	// still there), so the counter resumes monotonic when it comes back.
	live := make(map[state.Key]bool, len(snap.Attachments)+len(snap.Hidden))
	for i := range snap.Attachments {
		live[snap.Attachments[i].Record.Key()] = true
	}
	for k := range c.series {
		if !seen[k] && !live[k.key] {
			delete(c.series, k)
		}
	}
	for k := range c.classes {
		if !seenClass[k] && !live[k.key] {
			delete(c.classes, k)
		}
	}
}
