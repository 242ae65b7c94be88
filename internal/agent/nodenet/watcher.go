package nodenet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// Timing defaults of the Watcher.
const (
	// DefaultResync is the period of the full pass that repairs drift
	// (a route deleted by hand) when no Node changes.
	DefaultResync = 30 * time.Second
	// DefaultMinInterval spaces passes: a burst of Node events (a cluster
	// scaling up, the first list) costs one pass per interval, and an
	// event waits at most this long (plus the running pass) for its pass.
	DefaultMinInterval = 100 * time.Millisecond
	// errorRetry is how soon a failed pass is tried again.
	errorRetry = time.Second
	// syncWarnAfter: the first Node list taking longer is worth a warning.
	syncWarnAfter = 30 * time.Second
)

// ClusterCIDRSink receives the pod CIDRs of every node
// (podnet.(*Masq).SetClusterCIDRs: ipMasq leaves them alone).
type ClusterCIDRSink interface {
	SetClusterCIDRs(nets []net.IPNet) error
}

// WatcherConfig configures a Watcher.
type WatcherConfig struct {
	Client   kubernetes.Interface
	NodeName string // this node: no route to itself
	Routes   *Routes
	Masq     ClusterCIDRSink // nil = no ipMasq exclusion
	// Resync is the drift repair period (0 = DefaultResync).
	Resync time.Duration
	// MinInterval is the least time between two passes (0 = DefaultMinInterval).
	MinInterval time.Duration
	// Registerer receives the qoscni_nodenet_* series (nil = none).
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	// OnPass, when set, is called after each pass (tests, benchmarks).
	OnPass func(Result, error)
}

// Watcher keeps the routes to the other nodes' pods, and the ipMasq
// cluster CIDRs, in line with the Node objects: a Node added, changed or
// deleted triggers a pass (coalesced, see DefaultMinInterval), and a
// periodic pass repairs what changed in the kernel behind its back.
type Watcher struct {
	cfg      WatcherConfig
	factory  informers.SharedInformerFactory
	informer cache.SharedIndexInformer
	lister   listersv1.NodeLister
	metrics  *Metrics
	kick     chan struct{}
	log      *slog.Logger

	lastSkipped string // the skipped CIDRs last logged, to log changes only
}

// NewWatcher sets up the Node informer; Run starts it.
func NewWatcher(cfg WatcherConfig) (*Watcher, error) {
	if cfg.Client == nil {
		return nil, errors.New("watch nodes: no Kubernetes client")
	}
	if cfg.NodeName == "" {
		return nil, errors.New("watch nodes: node name is empty (set NODE_NAME from spec.nodeName)")
	}
	if cfg.Routes == nil && cfg.Masq == nil {
		return nil, errors.New("watch nodes: nothing to keep (no routes, no ipMasq)")
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.MinInterval <= 0 {
		cfg.MinInterval = DefaultMinInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	w := &Watcher{cfg: cfg, kick: make(chan struct{}, 1), log: cfg.Logger.With("component", "nodenet")}
	if cfg.Registerer != nil {
		w.metrics = NewMetrics()
		if err := w.metrics.Register(cfg.Registerer); err != nil {
			return nil, fmt.Errorf("register nodenet metrics: %w", err)
		}
	}
	// No informer resync: the cache is compared with the kernel on the
	// Watcher's own period, which needs no replay of every Node.
	w.factory = informers.NewSharedInformerFactory(cfg.Client, 0)
	nodes := w.factory.Core().V1().Nodes()
	w.informer = nodes.Informer()
	// Node objects carry images, conditions and capacity: keep only what
	// routing reads, so a large cluster costs little memory.
	if err := w.informer.SetTransform(slimNode); err != nil {
		return nil, fmt.Errorf("watch nodes: %w", err)
	}
	w.lister = nodes.Lister()
	_, err := w.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { w.Trigger() },
		UpdateFunc: func(oldObj, newObj any) {
			o, ok1 := oldObj.(*corev1.Node)
			n, ok2 := newObj.(*corev1.Node)
			// Status heartbeats change nothing routing reads.
			if ok1 && ok2 && PeerFromNode(o).Equal(PeerFromNode(n)) {
				return
			}
			w.Trigger()
		},
		DeleteFunc: func(any) { w.Trigger() },
	})
	if err != nil {
		return nil, fmt.Errorf("watch nodes: %w", err)
	}
	return w, nil
}

func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown tombstone
	}
	s := &corev1.Node{
		TypeMeta:   n.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion},
		Spec:       corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs},
	}
	if v, ok := n.Annotations[VTEPMACAnnotation]; ok {
		s.Annotations = map[string]string{VTEPMACAnnotation: v}
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			s.Status.Addresses = append(s.Status.Addresses, a)
		}
	}
	return s, nil
}

// Trigger asks for a pass soon (coalesced with other triggers).
func (w *Watcher) Trigger() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Run starts the informer, waits for the first list (a pass on a partial
// cache would delete the routes of the nodes not yet listed), then
// reconciles until ctx ends. It returns ctx's error, or an error when the
// cache never synced.
func (w *Watcher) Run(ctx context.Context) error {
	w.factory.Start(ctx.Done())
	defer w.factory.Shutdown()
	synced := make(chan bool, 1)
	go func() { synced <- cache.WaitForCacheSync(ctx.Done(), w.informer.HasSynced) }()
	select {
	case ok := <-synced:
		if !ok {
			return fmt.Errorf("watch nodes: cache not synced: %w", ctx.Err())
		}
	case <-time.After(syncWarnAfter):
		// The reflector retries forever and logs through klog only.
		w.log.Warn("nodes not listed yet: no pod routes until they are; can the agent list and watch nodes (RBAC)?", "waited", syncWarnAfter)
		if !<-synced {
			return fmt.Errorf("watch nodes: cache not synced: %w", ctx.Err())
		}
	}
	w.log.Info("watching nodes for pod routes", "node", w.cfg.NodeName, "routes", w.cfg.Routes != nil,
		"ipMasqClusterCIDRs", w.cfg.Masq != nil, "resync", w.cfg.Resync)

	var last time.Time
	run := time.NewTimer(0) // the first pass, right after the sync
	pending := true
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer run.Stop()
	defer retry.Stop()
	resync := time.NewTicker(w.cfg.Resync)
	defer resync.Stop()
	// A pass starts at once when the last one started MinInterval ago or
	// more, else when that interval is over: at most one pass per
	// interval, and never more than an interval (plus a running pass)
	// after the event that asked for it.
	schedule := func() {
		if pending {
			return
		}
		pending = true
		run.Reset(max(0, time.Until(last.Add(w.cfg.MinInterval))))
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-w.kick:
			schedule()
		case <-resync.C:
			schedule()
		case <-retry.C:
			schedule()
		case <-run.C:
			pending = false
			last = time.Now()
			if err := w.pass(); err != nil {
				retry.Reset(errorRetry)
			}
		}
	}
}

// pass reconciles the kernel with the cache once.
func (w *Watcher) pass() error {
	start := time.Now()
	nodes, err := w.lister.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list nodes from cache: %w", err)
	}
	peers := make([]Peer, 0, len(nodes))
	for _, n := range nodes {
		peers = append(peers, PeerFromNode(n))
	}
	var res Result
	var errs []error
	if w.cfg.Routes != nil {
		var rerr error
		res, rerr = w.cfg.Routes.Reconcile(peers)
		if rerr != nil {
			errs = append(errs, rerr)
			w.count("routes")
			w.log.Error("reconcile pod routes", "err", rerr)
		}
		if res.Added+res.Replaced+res.Deleted > 0 {
			w.log.Info("pod routes changed", "added", res.Added, "replaced", res.Replaced, "deleted", res.Deleted,
				"installed", res.Installed, "nodes", len(peers))
		}
		w.logSkipped(res.Skipped)
		if res.VTEPCreated {
			w.log.Warn("VXLAN device created: pod interfaces must not be larger than it; set \"mtu\" in the qoscni conflist to at most its MTU",
				"device", VXLANDevice, "mtu", res.VTEPMTU, "mac", res.VTEPMAC.String())
		}
		if res.VTEPMAC != nil {
			// Not an error of the pass: a fast retry would hammer the API
			// server (say, RBAC without patch); the resync tries again.
			if aerr := w.publishVTEP(res.VTEPMAC); aerr != nil {
				w.count("annotate")
				w.log.Error("publish VTEP MAC", "err", aerr)
			}
		}
	}
	if w.cfg.Masq != nil {
		if merr := w.cfg.Masq.SetClusterCIDRs(ClusterCIDRs(peers)); merr != nil {
			merr = fmt.Errorf("ipMasq cluster CIDRs: %w", merr)
			errs = append(errs, merr)
			w.count("masq")
			w.log.Error("reconcile ipMasq cluster CIDRs", "err", merr)
		}
	}
	err = errors.Join(errs...)
	if m := w.metrics; m != nil {
		m.duration.Observe(time.Since(start).Seconds())
		m.peers.Set(float64(len(peers)))
		if w.cfg.Routes != nil {
			m.routes.Set(float64(res.Installed))
			m.skipped.Set(float64(len(res.Skipped)))
			m.changes.WithLabelValues("add").Add(float64(res.Added))
			m.changes.WithLabelValues("replace").Add(float64(res.Replaced))
			m.changes.WithLabelValues("delete").Add(float64(res.Deleted))
		}
	}
	if w.cfg.OnPass != nil {
		w.cfg.OnPass(res, err)
	}
	return err
}

// publishVTEP sets this node's VTEPMACAnnotation when the cache shows
// another value (a merge patch of the one key: needs "patch" on nodes).
func (w *Watcher) publishVTEP(mac net.HardwareAddr) error {
	self, err := w.lister.Get(w.cfg.NodeName)
	if err != nil {
		return fmt.Errorf("own Node %s: %w", w.cfg.NodeName, err)
	}
	if self.Annotations[VTEPMACAnnotation] == mac.String() {
		return nil
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, VTEPMACAnnotation, mac.String())
	_, err = w.cfg.Client.CoreV1().Nodes().Patch(context.Background(), w.cfg.NodeName, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("annotate Node %s with %s=%s: %w", w.cfg.NodeName, VTEPMACAnnotation, mac, err)
	}
	w.log.Info("published VTEP MAC", "annotation", VTEPMACAnnotation, "mac", mac.String())
	return nil
}

func (w *Watcher) count(step string) {
	if w.metrics != nil {
		w.metrics.errors.WithLabelValues(step).Inc()
	}
}

// logSkipped reports the CIDRs without a route when that list changes,
// not on every periodic pass.
func (w *Watcher) logSkipped(skipped []Skipped) {
	lines := make([]string, 0, len(skipped))
	for _, s := range skipped {
		lines = append(lines, s.String())
	}
	slices.Sort(lines)
	key := strings.Join(lines, "\n")
	if key == w.lastSkipped {
		return
	}
	w.lastSkipped = key
	for _, s := range skipped {
		w.log.Warn("pod CIDR of another node not routed", "node", s.Peer, "podCIDR", s.Dst.String(), "reason", s.Reason, "detail", s.Detail)
	}
}
