// Package agent is the qoscni node daemon: the HTTP server for /metrics,
// /healthz and /readyz, and the status table of the node's shaped pods.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

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
	DefaultStateDir   = "/var/lib/cni/qoscni/state"
	DefaultJournalDir = "/var/lib/cni/qoscni/journal"
	DefaultCNIConfDir = "/etc/cni/net.d"
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
	// ShutdownTimeout bounds the wait for in-flight scrapes on SIGTERM.
	ShutdownTimeout time.Duration
}

// Server is a running agent.
type Server struct {
	cfg       Config
	ns        *metrics.Netns
	collector *metrics.Collector
	http      *http.Server
	ln        net.Listener
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
		StateDir: cfg.StateDir, JournalDir: cfg.JournalDir, CNIConfDir: cfg.CNIConfDir,
		Netns: ns, Version: cfg.Version, Logger: cfg.Logger,
	})
	reg := prometheus.NewRegistry()
	reg.MustRegister(col, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s := &Server{cfg: cfg, ns: ns, collector: col}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelError),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             30 * time.Second,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", s.ready)
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	s.ln = ln
	return s, nil
}

// Addr is the bound address (useful with port 0).
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Collector exposes the collector (tests, benchmarks).
func (s *Server) Collector() *metrics.Collector { return s.collector }

// ready says whether a scrape can read what it needs: the state directory
// (missing is fine: no pod yet) and the node's tc statistics.
func (s *Server) ready(w http.ResponseWriter, _ *http.Request) {
	if _, err := os.Stat(s.cfg.StateDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		http.Error(w, "state dir: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	if _, err := metrics.ReadRootQdiscs(s.ns); err != nil {
		http.Error(w, "tc: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ok")
}

// Serve runs until ctx is done, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context) error {
	log := s.cfg.Logger
	errc := make(chan error, 1)
	go func() { errc <- s.http.Serve(s.ln) }()
	log.Info("agent listening", "addr", s.Addr(), "stateDir", s.cfg.StateDir, "journalDir", s.cfg.JournalDir,
		"cniConfDir", s.cfg.CNIConfDir, "netns", s.cfg.NetnsPath)
	defer s.ns.Close()
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
