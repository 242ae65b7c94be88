// Package reconcile is the node agent's control loop over the attachments
// the plugin recorded: it reshapes a pod's attachments in place when its
// bandwidth annotations change, repairs shaping that drifted from the
// record, and removes what outlived its pod (devices, nftables elements,
// addresses, records). Every kernel change goes through shaping's one
// desired-vs-actual routine, the one CHECK uses.
//
// The package knows nothing of client-go: the Kubernetes side (kube/)
// feeds it pods through PodSource and PodChanged, and reports bad
// annotations through EventSink, so a fake, a real clientset or no API at
// all drop in alike.
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/florianl/go-tc"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// DefaultInterval is the period of the drift repair and GC pass.
const DefaultInterval = 30 * time.Second

// Pod is what the reconciler needs of a Kubernetes pod.
type Pod struct {
	Namespace   string
	Name        string
	UID         string
	Annotations map[string]string
	// ResourceVersion is the version the source has seen ("": unknown).
	ResourceVersion string
}

// PodSource answers for the pods of this node (an informer's cache).
type PodSource interface {
	// Synced reports whether the source has listed the node's pods at
	// least once; before that, "not found" means nothing.
	Synced() bool
	// Pod returns the node's pod of that name, false when there is none.
	Pod(namespace, name string) (Pod, bool)
	// UIDs are the UIDs of the node's pods.
	UIDs() map[string]bool
}

// EventSink reports on a pod (Kubernetes Events): problems, and what its
// shaping became.
type EventSink interface {
	Warn(pod Pod, reason, message string)
	Normal(pod Pod, reason, message string)
}

// Annotator sets (value "": removes) one annotation of a pod, without
// blocking the reconciler.
type Annotator interface {
	Annotate(pod Pod, key, value string)
}

// AttachmentCleaner is a per-attachment cleanup step beyond shaping,
// wiring, masquerade and IPAM, run by GC (portmap's hostPort elements plug
// in here). Implementations work in the node namespace they were built
// for and must be idempotent.
type AttachmentCleaner interface {
	// Name labels the step in logs and in qoscni_agent_gc_total{kind}.
	Name() string
	// Del removes what the stale attachment rec holds. An error keeps the
	// record, so the next pass retries.
	Del(rec *state.Record) error
	// GC removes what belongs to none of the live attachments. It must
	// tolerate an ADD in flight (objects made before the record is
	// written), e.g. by removing only what two consecutive calls saw. It
	// returns how many objects it removed.
	GC(live []*state.Record) (int, error)
}

// ReasonInvalidAnnotation is the Event reason for a bandwidth annotation
// that does not parse or is out of range.
const ReasonInvalidAnnotation = "InvalidBandwidthAnnotation"

// ReasonClaimOverridesRequest is the Event reason for a pod whose DRA
// bandwidth claims set its request in a direction where it also has a
// request annotation: the claim wins (the scheduler counted it), and the
// pod's author should know the annotation is not used.
const ReasonClaimOverridesRequest = "BandwidthClaimOverridesRequest"

// Config is what the reconciler works on.
type Config struct {
	// StateDir, the stateDir of every qoscni entry of CNIConfDir's files
	// and the directories registered in StateRegistry are where the
	// records are (cniconf.StateSources), listed anew on every pass.
	StateDir      string
	CNIConfDir    string // also for the IPAM config of a GC'd attachment's network
	StateRegistry string // "" = none
	// NetnsFd is the node namespace of the devices (-1 = the caller's).
	NetnsFd int
	// Pods is nil when the agent has no API access: no live reshaping, and
	// GC decides from the netns alone.
	Pods   PodSource
	Events EventSink // nil = log only
	// Annotator keeps AnnotationEffective on the pods (nil: not kept).
	Annotator Annotator
	// NodeName names the node in AnnotationEffective.
	NodeName string
	Cleaners []AttachmentCleaner
	Interval time.Duration // 0 = DefaultInterval
	Metrics  *Metrics      // nil = unregistered counters
	Logger   *slog.Logger

	// Repairers restore node-wide kernel state the records imply
	// (nftables, guards) on every pass, after GC and shaping repair.
	Repairers []KernelRepairer
}

// Reconciler owns the node namespace's shaping: one goroutine (Run) does
// all kernel work, so the Shaper needs no locking.
type Reconciler struct {
	cfg    Config
	log    *slog.Logger
	m      *Metrics
	caches *state.Caches
	shaper *shaping.Shaper
	nl     *netlink.Handle
	tc     *tc.Tc

	mu      sync.Mutex
	pending map[podRef]struct{}
	signal  chan struct{}
	passReq chan chan PassResult

	// bad remembers the last invalid-annotation message per pod, so one
	// bad value is reported once, not on every pass.
	bad map[podRef]string
	// badControls is bad for the packet-rate, connection and DSCP
	// annotations.
	badControls map[podRef]string
	// published is the AnnotationEffective value sent per pod and not yet
	// seen on it.
	published map[podRef]sentValue
	// announced is the value of the last ShapingApplied Event per pod.
	announced map[podRef]string
	// inKernel is what the last comparison with the kernel found per
	// attachment.
	inKernel map[state.Key]bool
	// overridden remembers the last "a claim replaces the request
	// annotation" message per pod, reported once the same way.
	overridden map[podRef]string
	// grantGone is when each DRA grant's pod was first seen missing.
	grantGone map[string]time.Time
	now       func() time.Time
	// suspects are qoscni-named links without a record seen by the last
	// pass (name -> ifindex): deleted when the next pass sees them again.
	suspects map[string]int
	// inUse are the links without a record kept because something uses
	// them (name -> ifindex), so that each is logged once.
	inUse map[string]int
	// confErrs is the last logged problem reading the state dirs' sources.
	confErrs string
	// dirs are the state directories the last listing read.
	dirs []string
}

// attachment is a record with the store it was read from: its update and
// deletion take that store's lock and path, since two networks' stores
// may hold records of one name.
type attachment struct {
	*state.Record
	store *state.Store
}

type podRef struct{ ns, name, uid string }

// New opens the node namespace's netlink sockets.
func New(cfg Config) (*Reconciler, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics()
	}
	sh, err := shaping.Open(cfg.NetnsFd)
	if err != nil {
		return nil, err
	}
	var h *netlink.Handle
	if cfg.NetnsFd >= 0 {
		h, err = netlink.NewHandleAt(netns.NsHandle(cfg.NetnsFd))
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		sh.Close()
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	tcCfg := &tc.Config{}
	if cfg.NetnsFd >= 0 {
		tcCfg.NetNS = cfg.NetnsFd
	}
	t, err := tc.Open(tcCfg)
	if err != nil {
		sh.Close()
		h.Close()
		return nil, fmt.Errorf("open tc netlink: %w", err)
	}
	return &Reconciler{
		cfg: cfg, log: cfg.Logger, m: cfg.Metrics, caches: state.NewCaches(),
		shaper: sh, nl: h, tc: t,
		pending: map[podRef]struct{}{}, signal: make(chan struct{}, 1), passReq: make(chan chan PassResult),
		bad: map[podRef]string{}, badControls: map[podRef]string{}, published: map[podRef]sentValue{}, announced: map[podRef]string{}, inKernel: map[state.Key]bool{}, overridden: map[podRef]string{}, suspects: map[string]int{}, inUse: map[string]int{},
		grantGone: map[string]time.Time{}, now: time.Now,
	}, nil
}

// Close releases the sockets; call after Run returned.
func (r *Reconciler) Close() {
	r.shaper.Close()
	r.nl.Close()
	r.tc.Close()
}

// PodChanged queues a pod for reshaping. It never blocks: changes of one
// pod that arrive while it waits are coalesced.
func (r *Reconciler) PodChanged(namespace, name string) {
	r.mu.Lock()
	r.pending[podRef{ns: namespace, name: name}] = struct{}{}
	r.mu.Unlock()
	select {
	case r.signal <- struct{}{}:
	default:
	}
}

// Run reshapes queued pods as they come and runs a full pass (reshape
// check, drift repair, GC) at start and every Interval, until ctx ends.
// Nothing runs between events and ticks: an idle node costs no CPU.
func (r *Reconciler) Run(ctx context.Context) error {
	r.Pass()
	t := time.NewTicker(r.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.signal:
			r.drain()
		case <-t.C:
			r.Pass()
		case reply := <-r.passReq:
			reply <- r.Pass()
		}
	}
}

// PassNow runs a full pass inside a running Run and returns its result
// (tests, benchmarks).
func (r *Reconciler) PassNow(ctx context.Context) (PassResult, error) {
	reply := make(chan PassResult, 1)
	select {
	case r.passReq <- reply:
	case <-ctx.Done():
		return PassResult{}, ctx.Err()
	}
	select {
	case res := <-reply:
		return res, nil
	case <-ctx.Done():
		return PassResult{}, ctx.Err()
	}
}

func (r *Reconciler) drain() {
	r.mu.Lock()
	refs := make([]podRef, 0, len(r.pending))
	for ref := range r.pending {
		refs = append(refs, ref)
	}
	clear(r.pending)
	r.mu.Unlock()
	if len(refs) == 0 || r.cfg.Pods == nil {
		return
	}
	recs, _, err := r.records()
	if err != nil {
		// The records of the other directories are still reshaped.
		r.m.errors.WithLabelValues("reshape").Inc()
		r.log.Error("list state records", "err", err)
	}
	byPod := map[[2]string][]attachment{}
	for _, rec := range recs {
		if rec.Provisional {
			continue // an ADD under way (or killed): nothing to reshape yet
		}
		k := [2]string{rec.Pod.Namespace, rec.Pod.Name}
		byPod[k] = append(byPod[k], rec)
	}
	acc := map[podRef]*podEffective{}
	for _, ref := range refs {
		pod, ok := r.cfg.Pods.Pod(ref.ns, ref.name)
		if !ok {
			continue
		}
		for _, rec := range byPod[[2]string{ref.ns, ref.name}] {
			if samePod(rec.Record, pod) {
				if o := r.reshape(rec, pod); o != outcomeGone {
					r.note(acc, r.current(rec), pod, o, o == outcomeApplied || o == outcomeFailed)
				}
			}
		}
	}
	r.publish(acc)
}

// current is the attachment's record as a reshape left it (the one the
// pass read, when it cannot be read again).
func (r *Reconciler) current(a attachment) *state.Record {
	if rec, err := a.store.Load(a.Record.Key()); err == nil && rec != nil {
		return rec
	}
	return a.Record
}

// samePod matches a record to a pod by namespace/name, and by UID when
// both have one (a pod recreated under the same name is another pod).
func samePod(rec *state.Record, pod Pod) bool {
	if rec.Pod.Namespace != pod.Namespace || rec.Pod.Name != pod.Name || rec.Pod.Name == "" {
		return false
	}
	return rec.Pod.UID == "" || pod.UID == "" || rec.Pod.UID == pod.UID
}

// StateSources are the places the reconciler learns its state
// directories from.
func (r *Reconciler) StateSources() cniconf.StateSources {
	return cniconf.StateSources{Own: r.cfg.StateDir, ConfDir: r.cfg.CNIConfDir, Registry: r.cfg.StateRegistry}
}

// records lists the records of every state directory of the node, stored
// where their key says. A misplaced copy (an operator's, another
// network's record in the wrong directory) would make the agent act on
// another attachment: it is logged, never acted on. err joins the
// directories that could not be listed; the records of the others are
// returned all the same.
func (r *Reconciler) records() ([]attachment, []state.BadFile, error) {
	dirs, cerrs := r.StateSources().Dirs()
	// A conflist that does not parse is the operator's to fix, and libcni
	// skips it too: said once, not on every pass.
	if msg := errors.Join(cerrs...); msg == nil {
		r.confErrs = ""
	} else if msg.Error() != r.confErrs {
		r.confErrs = msg.Error()
		r.log.Warn("reading where the state directories are", "err", msg)
	}
	r.dirs = dirs
	entries, bad, errs := r.caches.Entries(dirs)
	recs := make([]attachment, 0, len(entries))
	for _, e := range entries {
		if e.Misplaced {
			r.log.Warn("ignoring a state record stored under another attachment's name", "file", e.Path,
				"network", e.Record.Network, "container", e.Record.ContainerID, "ifname", e.Record.IfName)
			continue
		}
		recs = append(recs, attachment{e.Record, e.Store})
	}
	return recs, bad, errors.Join(errs...)
}

// PassResult counts what one pass did.
type PassResult struct {
	Records  int
	Reshaped int
	Repaired int
	GCed     int
	Errors   int
	Duration time.Duration
}

// Pass runs one full pass: GC first (so a stale attachment is not
// "repaired"), then for every record the annotation check (when the API
// knows its pod) and the drift repair. Call it only from the goroutine
// that runs Run, or when Run is not running.
func (r *Reconciler) Pass() PassResult {
	start := time.Now()
	var res PassResult
	recs, bad, err := r.records()
	if err != nil {
		// The records of the directories that could be read are still
		// acted on; link GC, which must know every record, waits.
		r.m.errors.WithLabelValues("list").Inc()
		r.log.Error("list state records", "err", err)
		res.Errors++
	}
	live := r.gc(recs, bad, err == nil, &res)
	res.Records = len(live)
	// One qdisc dump for the whole pass instead of one per attachment.
	if err := r.shaper.BeginPass(); err != nil {
		r.m.errors.WithLabelValues("dump").Inc()
		r.log.Error("dump qdiscs", "err", err)
	}
	defer r.shaper.EndPass()
	acc := map[podRef]*podEffective{}
	for _, rec := range live {
		if rec.Provisional {
			continue // an ADD under way: its shaping is not decided yet
		}
		var pod Pod
		known := false
		if r.cfg.Pods != nil && r.cfg.Pods.Synced() {
			pod, known = r.cfg.Pods.Pod(rec.Pod.Namespace, rec.Pod.Name)
			known = known && samePod(rec.Record, pod)
		}
		if known {
			switch o := r.reshape(rec, pod); o {
			case outcomeApplied:
				res.Reshaped++
				r.note(acc, r.current(rec), pod, o, true)
				continue // the reshape's Apply compared with the kernel already
			case outcomeFailed:
				res.Errors++
				r.note(acc, rec.Record, pod, o, true)
				continue
			}
		}
		o := r.repair(rec.Record)
		switch o {
		case outcomeApplied:
			res.Repaired++
		case outcomeFailed:
			res.Errors++
		}
		if known {
			r.note(acc, rec.Record, pod, o, true)
		}
	}
	r.repairKernel(live, &res)
	r.publish(acc)
	for ref := range r.published {
		if acc[ref] == nil {
			delete(r.published, ref) // the pod's attachments are gone
		}
	}
	for ref := range r.announced {
		if acc[ref] == nil {
			delete(r.announced, ref)
		}
	}
	alive := make(map[state.Key]bool, len(live))
	for _, rec := range live {
		alive[rec.Key()] = true
	}
	for k := range r.inKernel {
		if !alive[k] {
			delete(r.inKernel, k)
		}
	}
	r.gcGrants(&res)
	res.Duration = time.Since(start)
	r.m.passDuration.Observe(res.Duration.Seconds())
	r.log.Debug("reconcile pass", "records", res.Records, "reshaped", res.Reshaped, "repaired", res.Repaired,
		"gc", res.GCed, "errors", res.Errors, "took", res.Duration)
	return res
}

type outcome int

const (
	outcomeNone outcome = iota
	outcomeApplied
	outcomeInvalid
	outcomeFailed
	outcomeGone
)

var errUnchanged = errors.New("unchanged")
