// Package agent is the qoscni node daemon: the HTTP server for /metrics,
// /healthz and /readyz, the status table of the node's shaped pods, and
// the reconciler (live reshaping from pod annotations, drift repair, GC)
// with its Kubernetes pod watcher.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/agent/kube"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/sysctl"
	"github.com/qoscni/qoscni/metrics"
)

// DefaultListen is the default address: port 9742 lies in the 9100-9999
// range Prometheus keeps for exporters and is not used by the exporters
// commonly found on Kubernetes nodes (node-exporter 9100, kubelet 10250,
// kube-proxy 10249). All addresses, because the DaemonSet runs with the host
// network and Prometheus scrapes the node IP.
const DefaultListen = ":9742"

// ListenEnv overrides DefaultListen; the --listen flag overrides both.
const ListenEnv = "QOSCNI_AGENT_LISTEN"

// Defaults of the other flags.
const (
	DefaultStateDir   = paths.StateDir
	DefaultJournalDir = paths.JournalDir
	DefaultCNIConfDir = paths.CNIConfDir
)

// Config is the agent's configuration.
type Config struct {
	Listen     string
	StateDir   string
	JournalDir string
	CNIConfDir string
	NetnsPath  string // "" = the agent's own namespace
	Version    string
	Logger     *slog.Logger
	// StateRegistry is the plugin's registry of state directories
	// (state.DefaultRegistryDir on a node; "" = none). With StateDir and
	// the stateDirs of CNIConfDir's qoscni networks it says where the
	// records are, for the metrics and the reconciler alike.
	StateRegistry string
	// ShutdownTimeout bounds the wait for in-flight scrapes on SIGTERM.
	ShutdownTimeout time.Duration

	// Kube is the API client (nil = no API access: no live reshaping, GC
	// decides from the pods' netns alone).
	Kube kubernetes.Interface
	// NodeName selects the pods to watch (spec.nodeName).
	NodeName string
	// ReconcileInterval is the period of drift repair and GC
	// (0 = reconcile.DefaultInterval).
	ReconcileInterval time.Duration
	// Cleaners are extra per-attachment GC steps (portmap).
	Cleaners []reconcile.AttachmentCleaner
	// Repairers restore node-wide kernel state from the records on every
	// pass (portmap's rules, elements and localnet guards; ipMasq).
	Repairers []reconcile.KernelRepairer
	// Registry, when set, is where /metrics is served from, so that other
	// parts of the agent (pod routes) add their metrics; nil = a new one.
	Registry *prometheus.Registry
	// ProcSys is where /readyz reads the node's br_netfilter settings
	// ("" = /proc/sys, which shows the node's: hostNetwork).
	ProcSys sysctl.Tree
}

// Server is a running agent.
type Server struct {
	cfg       Config
	ns        *metrics.Netns
	collector *metrics.Collector
	http      *http.Server
	ln        net.Listener
	nodeNS    int // fd of the node namespace for the reconciler, -1 = own
	rec       *reconcile.Reconciler
	pods      *kube.PodWatcher
	// statusSlot lets one /status reading run at a time: each holds its
	// requester for the interval.
	statusSlot sync.Mutex
}

// New opens the node namespace and binds the listen address.
func New(cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	ns, err := metrics.OpenNetns(cfg.NetnsPath)
	if err != nil {
		return nil, err
	}
	col := metrics.NewCollector(metrics.Config{
		StateDir: cfg.StateDir, StateRegistry: cfg.StateRegistry, JournalDir: cfg.JournalDir, CNIConfDir: cfg.CNIConfDir,
		Netns: ns, Version: cfg.Version, Logger: cfg.Logger,
	})
	reg := cfg.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	reg.MustRegister(col, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s := &Server{cfg: cfg, ns: ns, collector: col, nodeNS: -1}
	if err := s.newReconciler(reg); err != nil {
		ns.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelError),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             30 * time.Second,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", s.ready)
	mux.HandleFunc("GET /status", s.status)
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		s.closeReconciler()
		ns.Close()
		return nil, fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	s.ln = ln
	return s, nil
}

func (s *Server) newReconciler(reg prometheus.Registerer) error {
	if s.cfg.NetnsPath != "" {
		fd, err := unix.Open(s.cfg.NetnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open netns %s: %w", s.cfg.NetnsPath, err)
		}
		s.nodeNS = fd
	}
	m := reconcile.NewMetrics()
	if err := m.Register(reg); err != nil {
		s.closeReconciler()
		return err
	}
	rcfg := reconcile.Config{
		StateDir: s.cfg.StateDir, CNIConfDir: s.cfg.CNIConfDir, StateRegistry: s.cfg.StateRegistry, NetnsFd: s.nodeNS,
		Cleaners: s.cfg.Cleaners, Interval: s.cfg.ReconcileInterval, Metrics: m, Logger: s.cfg.Logger,
		Repairers: s.cfg.Repairers, NodeName: s.cfg.NodeName,
	}
	var h reconcileHandler
	if s.cfg.Kube != nil {
		w, err := kube.NewPodWatcher(s.cfg.Kube, s.cfg.NodeName, &h, s.cfg.Logger)
		if err != nil {
			s.closeReconciler()
			return err
		}
		s.pods = w
		rcfg.Pods = w
		rcfg.Events = &kube.Events{Client: s.cfg.Kube, Node: s.cfg.NodeName, Log: s.cfg.Logger}
		rcfg.Annotator = &kube.Annotator{Client: s.cfg.Kube, Log: s.cfg.Logger}
	}
	r, err := reconcile.New(rcfg)
	if err != nil {
		s.closeReconciler()
		return err
	}
	h.r = r
	s.rec = r
	return nil
}

// reconcileHandler breaks the cycle watcher -> reconciler -> watcher.
type reconcileHandler struct{ r *reconcile.Reconciler }

func (h *reconcileHandler) PodChanged(ns, name string) {
	if h.r != nil {
		h.r.PodChanged(ns, name)
	}
}

func (s *Server) closeReconciler() {
	if s.rec != nil {
		s.rec.Close()
		s.rec = nil
	}
	if s.nodeNS >= 0 {
		unix.Close(s.nodeNS)
		s.nodeNS = -1
	}
}

// Reconciler exposes the reconciler (tests, benchmarks).
func (s *Server) Reconciler() *reconcile.Reconciler { return s.rec }

// Addr is the bound address (useful with port 0).
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Collector exposes the collector (tests, benchmarks).
func (s *Server) Collector() *metrics.Collector { return s.collector }

// ready says whether a scrape can read what it needs: the state directory
// (missing is fine: no pod yet) and the node's tc statistics; and whether
// the node passes bridged pod traffic to iptables where qoscni's pods need
// it.
// status serves what `qoscni-agent status -o json` prints, read from the
// kernel now: the rows of the pod named by the namespace and pod query
// parameters (both optional), rates measured over interval (default 1s,
// at most 10s). `kubectl qoscni explain` reads it through the API server.
func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	interval := time.Second
	if v := q.Get("interval"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 || d > 10*time.Second {
			http.Error(w, "interval: a Go duration above 0 and at most 10s", http.StatusBadRequest)
			return
		}
		interval = d
	}
	if !s.statusSlot.TryLock() {
		http.Error(w, "a status reading is under way", http.StatusTooManyRequests)
		return
	}
	rows, err := Status(cniconf.StateSources{Own: s.cfg.StateDir, ConfDir: s.cfg.CNIConfDir, Registry: s.cfg.StateRegistry}, s.cfg.NetnsPath, interval)
	s.statusSlot.Unlock()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	ns, pod := q.Get("namespace"), q.Get("pod")
	out := rows[:0]
	for _, row := range rows {
		if (ns == "" || row.Namespace == ns) && (pod == "" || row.Pod == pod) && (row.Scope != ScopeNode || pod == "") {
			out = append(out, row)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if err := WriteStatus(w, out, true); err != nil {
		s.cfg.Logger.Warn("write status", "err", err)
	}
}

func (s *Server) ready(w http.ResponseWriter, _ *http.Request) {
	if _, err := os.Stat(s.cfg.StateDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		http.Error(w, "state dir: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	if _, err := metrics.ReadRootQdiscs(s.ns); err != nil {
		http.Error(w, "tc: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	if err := s.bridgeNetfilter(); err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ok")
}

// bridgeNetfilter answers what the plugin's STATUS answers about
// br_netfilter (podnet.BridgeNetfilter), with the same message, for the
// nodes whose runtime never calls STATUS (containerd before 2.0). Only a
// standalone qoscni network (qoscni first in its file) puts pods on a
// bridge of qoscni's; behind another main plugin br_netfilter is that
// plugin's concern. It only reads: the container's /proc/sys is read only,
// and the plugin's next ADD or STATUS sets a sysctl found at 0 back to 1.
func (s *Server) bridgeNetfilter() error {
	files, _ := cniconf.ReadDir(s.cfg.CNIConfDir)
	if !slices.ContainsFunc(files, (*cniconf.File).MainIsQoscni) {
		return nil
	}
	return podnet.BridgeNetfilter{ProcSys: s.cfg.ProcSys, NetnsFd: s.nodeNS}.Check()
}

// Serve runs until ctx is done, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context) error {
	log := s.cfg.Logger
	errc := make(chan error, 1)
	go func() { errc <- s.http.Serve(s.ln) }()
	log.Info("agent listening", "addr", s.Addr(), "stateDir", s.cfg.StateDir, "stateRegistry", s.cfg.StateRegistry, "journalDir", s.cfg.JournalDir,
		"cniConfDir", s.cfg.CNIConfDir, "netns", s.cfg.NetnsPath)
	defer s.ns.Close()
	rctx, stopReconciler := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		stopReconciler()
		wg.Wait()
		if s.pods != nil {
			s.pods.Shutdown()
		}
		s.closeReconciler()
	}()
	if s.pods != nil {
		s.pods.Start(rctx)
		log.Info("watching the node's pods through the Kubernetes API", "node", s.cfg.NodeName)
	} else {
		log.Warn("no Kubernetes API access: pod annotations are not watched (no live reshaping, no Events); " +
			"drift repair runs, and GC removes attachments whose netns is gone")
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = s.rec.Run(rctx)
	}()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down", "timeout", s.cfg.ShutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	if err := s.http.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("stopped")
	return nil
}
