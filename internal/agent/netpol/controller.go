package netpol

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	listersnetv1 "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/cni/netpolnft"
	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
)

// Defaults of Config.
const (
	// DefaultPoll is how often the pending set is read: a new pod waits
	// for the agent at most about this long (plus one compilation and
	// one transaction) once the API has its labels.
	DefaultPoll = 50 * time.Millisecond
	// DefaultResync rewrites the whole state from scratch (an `nft flush
	// ruleset`, a hand-made change).
	DefaultResync = 30 * time.Second
	// settle coalesces a burst of API events into one transaction.
	settle = 20 * time.Millisecond
)

// Config is the controller's.
type Config struct {
	Client     kubernetes.Interface
	CNIConfDir string // where the networks that enforce policy are
	NetnsFd    int    // the node namespace (-1 = the agent's)
	Poll       time.Duration
	Resync     time.Duration
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Controller keeps the node's NetworkPolicy sets in step with the API
// and with the node's attachments.
type Controller struct {
	cfg      Config
	factory  informers.SharedInformerFactory
	pods     listersv1.PodLister
	spaces   listersv1.NamespaceLister
	policies listersnetv1.NetworkPolicyLister
	synced   []cache.InformerSynced
	kick     chan struct{}
	ids      *Identities
	m        *netpolnft.Manager
	metrics  *metrics
	lastErr  string
	active   bool
	lastNets int
}

type metrics struct {
	syncs    *prometheus.CounterVec
	duration prometheus.Histogram
	pending  prometheus.Gauge
	isolated *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "qoscni_agent_netpol_syncs_total",
			Help: "NetworkPolicy syncs of the node's sets, by result (changed, unchanged, error)."}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "qoscni_agent_netpol_sync_seconds",
			Help:    "Time to compile the node's NetworkPolicy and write it in one transaction.",
			Buckets: []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{Name: "qoscni_agent_netpol_pending_addresses",
			Help: "Pod addresses closed until their NetworkPolicy is written (their pod not yet known to the agent)."}),
		isolated: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "qoscni_agent_netpol_isolated_addresses",
			Help: "The node's pod addresses isolated by some NetworkPolicy, by direction."}, []string{"direction"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.syncs, m.duration, m.pending, m.isolated} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// NewController sets up the informers (every pod, namespace and
// NetworkPolicy of the cluster: a peer may be any pod).
func NewController(cfg Config) (*Controller, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Poll <= 0 {
		cfg.Poll = DefaultPoll
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	met, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	f := informers.NewSharedInformerFactory(cfg.Client, 0)
	c := &Controller{cfg: cfg, factory: f, kick: make(chan struct{}, 1), ids: NewIdentities(), metrics: met}
	pods := f.Core().V1().Pods()
	if err := pods.Informer().SetTransform(slimPod); err != nil {
		return nil, err
	}
	spaces := f.Core().V1().Namespaces()
	policies := f.Networking().V1().NetworkPolicies()
	c.pods, c.spaces, c.policies = pods.Lister(), spaces.Lister(), policies.Lister()
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.Kick() },
		UpdateFunc: func(any, any) { c.Kick() },
		DeleteFunc: func(any) { c.Kick() },
	}
	for _, inf := range []cache.SharedIndexInformer{pods.Informer(), spaces.Informer(), policies.Informer()} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return nil, err
		}
		c.synced = append(c.synced, inf.HasSynced)
	}
	return c, nil
}

// slimPod keeps what policies read: identity, labels, addresses, phase,
// host network, named ports.
func slimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{
		TypeMeta:   p.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion, Labels: p.Labels},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork},
		Status:     corev1.PodStatus{Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs},
	}
	for _, ct := range p.Spec.Containers {
		var ports []corev1.ContainerPort
		for _, cp := range ct.Ports {
			if cp.Name != "" {
				ports = append(ports, corev1.ContainerPort{Name: cp.Name, ContainerPort: cp.ContainerPort, Protocol: cp.Protocol})
			}
		}
		if len(ports) > 0 {
			out.Spec.Containers = append(out.Spec.Containers, corev1.Container{Name: ct.Name, Ports: ports})
		}
	}
	return out, nil
}

// Kick asks for a sync soon.
func (c *Controller) Kick() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Run syncs until ctx ends: after API changes, when an address is
// pending, and every Resync.
func (c *Controller) Run(ctx context.Context) error {
	m, err := netpolnft.New(c.cfg.NetnsFd)
	if err != nil {
		return err
	}
	defer m.Close()
	c.m = m
	// Watch the cluster's pods only on a node that enforces policy (or
	// did: what it left must be lifted).
	for wait := time.Duration(0); ; wait = c.cfg.Resync / 6 {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		nets, _ := cniconf.PolicyNetworks(c.cfg.CNIConfDir)
		if len(nets) > 0 {
			break
		}
		if ok, err := m.HasBase(); err == nil && ok {
			break
		}
	}
	// The first sync enforces, or lifts what an earlier run left.
	c.active = true
	c.factory.Start(ctx.Done())
	defer c.factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return ctx.Err()
	}
	c.cfg.Logger.Info("NetworkPolicy: watching policies, pods and namespaces")
	poll := time.NewTicker(c.cfg.Poll)
	defer poll.Stop()
	resync := time.NewTicker(c.cfg.Resync)
	defer resync.Stop()
	c.Sync()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.kick:
			// A burst of events (a kubectl apply of many objects) is one
			// transaction.
			time.Sleep(settle)
			select {
			case <-c.kick:
			default:
			}
			c.Sync()
		case <-resync.C:
			c.Sync()
		case <-poll.C:
			if !c.active {
				continue
			}
			// A new pod waits in the pending set; a flushed ruleset
			// (no chains) enforces nothing until written back.
			if p, err := c.m.Pending(); err == nil && len(p) > 0 {
				c.Sync()
			} else if ok, err := c.m.HasBase(); err == nil && !ok {
				c.cfg.Logger.Warn("NetworkPolicy: the chains are gone from table inet qoscni (a flushed ruleset?): writing them back")
				c.Sync()
			}
		}
	}
}

// Sync compiles the node's state and writes the difference in one
// transaction. Errors are logged once and counted; the next sync retries.
func (c *Controller) Sync() {
	start := time.Now()
	n, err := c.sync()
	c.metrics.duration.Observe(time.Since(start).Seconds())
	switch {
	case err != nil:
		c.metrics.syncs.WithLabelValues("error").Inc()
		if err.Error() != c.lastErr {
			c.cfg.Logger.Error("NetworkPolicy sync", "err", err)
		}
		c.lastErr = err.Error()
		return
	case n > 0:
		c.metrics.syncs.WithLabelValues("changed").Inc()
		c.cfg.Logger.Debug("NetworkPolicy sync", "changes", n, "took", time.Since(start))
	default:
		c.metrics.syncs.WithLabelValues("unchanged").Inc()
	}
	c.lastErr = ""
}

func (c *Controller) sync() (int, error) {
	nets, cerrs := cniconf.PolicyNetworks(c.cfg.CNIConfDir)
	if len(nets) == 0 && len(cerrs) > 0 {
		return 0, errors.Join(cerrs...)
	}
	if len(nets) == 0 {
		if !c.active {
			return 0, nil
		}
		// Enforcement turned off: nothing isolated, nothing pending.
		c.active, c.lastNets = false, 0
		c.cfg.Logger.Info("NetworkPolicy: no network of the node enforces it any more; lifting it")
		n, err := c.m.Apply(&netpolnft.State{})
		if err != nil {
			return n, err
		}
		gone, err := c.m.GC(func(netpolnft.Owner) bool { return false })
		return n + gone, err
	}
	if !c.active || c.lastNets != len(nets) {
		c.cfg.Logger.Info("NetworkPolicy: enforcing", "networks", len(nets))
		c.active, c.lastNets = true, len(nets)
	}
	in, pending, err := c.input(nets)
	if err != nil {
		return 0, err
	}
	d, err := Compile(in, c.ids)
	if err != nil {
		return 0, err
	}
	n, err := c.m.Apply(d.State())
	if err != nil {
		return 0, err
	}
	left := 0
	for a, o := range pending {
		if r, ok := d.Ready[a]; !ok || !r.Same(o) {
			left++
		}
	}
	c.metrics.pending.Set(float64(left))
	c.metrics.isolated.WithLabelValues("ingress").Set(float64(len(d.IngressIsolated)))
	c.metrics.isolated.WithLabelValues("egress").Set(float64(len(d.EgressIsolated)))
	return n, nil
}

// input gathers the API's objects and the node's attachments: the
// records of the networks that enforce policy, and the pending
// addresses, whose owner tag names their pod before any record does.
func (c *Controller) input(nets map[string]string) (Input, map[netip.Addr]netpolnft.Owner, error) {
	var in Input
	var err error
	if in.Policies, err = c.policies.List(labels.Everything()); err != nil {
		return in, nil, err
	}
	if in.Pods, err = c.pods.List(labels.Everything()); err != nil {
		return in, nil, err
	}
	if in.Namespaces, err = c.spaces.List(labels.Everything()); err != nil {
		return in, nil, err
	}
	seen := map[netip.Addr]bool{}
	for network, dir := range nets {
		recs, _, err := state.New(dir).List(network)
		if err != nil {
			return in, nil, fmt.Errorf("records of network %s: %w", network, err)
		}
		for _, rec := range recs {
			if rec.Provisional || rec.Mode == state.ModeChained {
				continue
			}
			at := Attachment{Pod: types.NamespacedName{Namespace: rec.Pod.Namespace, Name: rec.Pod.Name}, Owner: nfraw.OwnerOf(rec)}
			for _, ip := range rec.IPs {
				if p, err := netip.ParsePrefix(ip); err == nil {
					at.Addrs = append(at.Addrs, p.Addr().Unmap())
					seen[p.Addr().Unmap()] = true
				}
			}
			in.Local = append(in.Local, at)
		}
	}
	pending, err := c.m.Pending()
	if err != nil {
		return in, nil, err
	}
	byOwner := map[string]*Attachment{}
	for a, o := range pending {
		if seen[a] || o.PodName == "" {
			continue
		}
		k := o.ContainerID + "/" + o.IfName
		at := byOwner[k]
		if at == nil {
			at = &Attachment{Pod: types.NamespacedName{Namespace: o.PodNamespace, Name: o.PodName}, Owner: o}
			byOwner[k] = at
		}
		at.Addrs = append(at.Addrs, a)
	}
	for _, at := range byOwner {
		in.Local = append(in.Local, *at)
	}
	return in, pending, nil
}

// Start runs a controller in the background; stop waits for it to end
// (cancel ctx first).
func Start(ctx context.Context, cfg Config) (stop func(), err error) {
	c, err := NewController(cfg)
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := c.Run(ctx); err != nil && ctx.Err() == nil {
			cfg.Logger.Error("NetworkPolicy controller stopped", "err", err)
		}
	}()
	return func() { <-done }, nil
}
