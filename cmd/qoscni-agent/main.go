// Command qoscni-agent is the qoscni node daemon. "qoscni-agent [serve]"
// serves /metrics, /healthz and /readyz and reconciles the node's
// attachments (live reshaping from pod annotations, drift repair, GC);
// "qoscni-agent status" prints the node's shaped pods; install and
// uninstall put qoscni on a node and take it off.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/agent"
	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/agent/dra"
	"github.com/qoscni/qoscni/internal/agent/install"
	"github.com/qoscni/qoscni/internal/agent/kube"
	"github.com/qoscni/qoscni/internal/agent/netpol"
	"github.com/qoscni/qoscni/internal/agent/nodenet"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/cni/netpolnft"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `usage: qoscni-agent [command] [flags]

commands:
  serve       run the node daemon: metrics, live reshaping, drift repair, GC (the default)
  status      print the node's shaped pods and their live rates
  install     put the plugin and its network config on the node (the DaemonSet's init container)
  uninstall   take qoscni off the node
  help        print this text

"qoscni-agent COMMAND -h" lists the flags of a command.
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// run is the whole command line: the exit status is 0 done, 1 failed, 2
// bad usage. A word that names no command is refused: it used to start the
// daemon, so "qoscni-agent help" ran a second agent.
func run(args []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "install", "uninstall":
		// They run as the DaemonSet's init container or by hand.
		return install.Main(append([]string{cmd}, args...), stdout, stderr)
	case "help":
		fmt.Fprint(stdout, usage)
		return 0
	case "serve", "status":
	default:
		fmt.Fprintf(stderr, "qoscni-agent: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	o, code := parseFlags(cmd, args, stderr)
	if o == nil {
		return code
	}
	if cmd == "status" {
		rows, err := agent.Status(o.sources(), o.netnsPath, o.interval)
		if err == nil {
			err = agent.WriteStatus(stdout, rows, o.output == "json")
		}
		if err != nil {
			fmt.Fprintln(stderr, "qoscni-agent status:", err)
			return 1
		}
		return 0
	}
	return serve(o)
}

// draDriverEnv is the default of --dra-driver.
const draDriverEnv = "QOSCNI_DRA_DRIVER"

// envOr is the environment variable k, or def where it is unset.
func envOr(k, def string) string {
	if v, ok := os.LookupEnv(k); ok {
		return v
	}
	return def
}

// options are serve's and status's flags, checked.
type options struct {
	listen, stateDir, stateRegistry, journalDir, cniConfDir, netnsPath string
	output, kubeconfig, nodeName                                       string
	interval, reconcileInterval                                        time.Duration
	routesMode                                                         nodenet.Mode
	draDriver, kubeletDir                                              string
	draPolicy                                                          dra.Policy
	logger                                                             *slog.Logger
}

func (o *options) sources() cniconf.StateSources {
	return cniconf.StateSources{Own: o.stateDir, ConfDir: o.cniConfDir, Registry: o.stateRegistry}
}

// parseFlags reads the flags of serve or status; nil and the exit status
// when they are wrong (or -h was asked for).
func parseFlags(cmd string, args []string, stderr io.Writer) (*options, int) {
	fs := flag.NewFlagSet("qoscni-agent "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := &options{listen: agent.DefaultListen}
	if v := os.Getenv(agent.ListenEnv); v != "" {
		o.listen = v
	}
	fs.StringVar(&o.listen, "listen", o.listen, "address for /metrics, /healthz, /readyz (env "+agent.ListenEnv+")")
	fs.StringVar(&o.stateDir, "state-dir", agent.DefaultStateDir, "plugin attachment records (the records of other qoscni networks are found through --cni-conf-dir and --state-registry)")
	fs.StringVar(&o.stateRegistry, "state-registry", state.DefaultRegistryDir, "the plugin's registry of the state dirs it writes records to (\"\" = none)")
	fs.StringVar(&o.journalDir, "journal-dir", agent.DefaultJournalDir, "plugin call journal (the sibling 'journal' of the plugin's stateDir)")
	fs.StringVar(&o.cniConfDir, "cni-conf-dir", agent.DefaultCNIConfDir, "CNI config files, read for the qoscni networks' stateDir and built-in IPAM")
	fs.StringVar(&o.netnsPath, "netns", "", "network namespace of the node's devices (default: the agent's own)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.output, "o", "table", "status output: table or json")
	fs.DurationVar(&o.interval, "interval", time.Second, "status: time between the two statistics reads")
	fs.StringVar(&o.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file (env KUBECONFIG; default: the in-cluster service account, else no API access)")
	fs.StringVar(&o.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name, whose pods are watched (env NODE_NAME, from spec.nodeName)")
	fs.DurationVar(&o.reconcileInterval, "reconcile-interval", reconcile.DefaultInterval, "period of drift repair and garbage collection")
	podRoutes := fs.String("pod-routes", os.Getenv(nodenet.ModeEnv), "routes to the pods of other nodes (standalone mode): off, hostgw, vxlan or auto (host-gw to on-link nodes, VXLAN to the others) (env "+nodenet.ModeEnv+"; default off)")
	fs.StringVar(&o.draDriver, "dra-driver", envOr(draDriverEnv, dra.DefaultDriverName), "DRA driver name under which the node's guaranteed bandwidth is offered to the scheduler (\"\" = no DRA driver) (env "+draDriverEnv+")")
	fs.StringVar(&o.kubeletDir, "kubelet-dir", dra.DefaultKubeletDir, "the kubelet's --root-dir: the DRA driver registers in its plugins_registry")
	draDefault := fs.String("dra-default-request", "10M", "DRA: the bandwidth a claim that names no amount consumes, bit/s")
	draMin := fs.String("dra-min-request", "1M", "DRA: the smallest bandwidth a claim consumes, bit/s")
	draStep := fs.String("dra-request-step", "1M", "DRA: claims are rounded up to the minimum plus a multiple of this, bit/s")
	draMax := fs.String("dra-max-request", "", "DRA: the largest bandwidth one claim may take, bit/s (\"\" = the node capacity, or the network's ceilings.maxRequest)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, 0
		}
		return nil, 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "qoscni-agent %s: unexpected argument %q (flags only; \"qoscni-agent help\" lists the commands)\n", cmd, fs.Arg(0))
		return nil, 2
	}
	var err error
	if o.routesMode, err = nodenet.ParseMode(*podRoutes); err != nil {
		fmt.Fprintln(stderr, "qoscni-agent: -pod-routes:", err)
		return nil, 2
	}
	for _, f := range []struct {
		flag, v string
		out     *uint64
	}{{"-dra-default-request", *draDefault, &o.draPolicy.DefaultBits}, {"-dra-min-request", *draMin, &o.draPolicy.MinBits},
		{"-dra-request-step", *draStep, &o.draPolicy.StepBits}, {"-dra-max-request", *draMax, &o.draPolicy.MaxBits}} {
		if f.v == "" {
			continue
		}
		if *f.out, err = shaping.ParseBits(f.flag, f.v); err != nil {
			fmt.Fprintln(stderr, "qoscni-agent:", err)
			return nil, 2
		}
	}
	if err := o.draPolicy.Check(); err != nil {
		fmt.Fprintln(stderr, "qoscni-agent: -dra-*-request:", err)
		return nil, 2
	}
	if o.output != "table" && o.output != "json" {
		fmt.Fprintf(stderr, "qoscni-agent: -o %q: want table or json\n", o.output)
		return nil, 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(stderr, "qoscni-agent: -log-level:", err)
		return nil, 2
	}
	if cmd == "serve" && o.reconcileInterval <= 0 {
		fmt.Fprintln(stderr, "qoscni-agent: -reconcile-interval must be positive")
		return nil, 2
	}
	o.logger = slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	return o, 0
}

// serve runs the daemon until SIGTERM or an interrupt.
func serve(o *options) int {
	logger := o.logger
	client, err := kube.NewClient(o.kubeconfig)
	switch {
	case errors.Is(err, kube.ErrNoAPI):
		client = nil // the agent says so once when it starts serving
	case err != nil:
		logger.Error("start", "err", err)
		return 1
	case o.nodeName == "":
		logger.Error("start: the Kubernetes API is reachable but the node name is unknown: set NODE_NAME (fieldRef spec.nodeName) or --node-name")
		return 1
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	cfg := agent.Config{Listen: o.listen, StateDir: o.stateDir, StateRegistry: o.stateRegistry, JournalDir: o.journalDir,
		CNIConfDir: o.cniConfDir, NetnsPath: o.netnsPath, Version: version, Logger: logger,
		NodeName: o.nodeName, ReconcileInterval: o.reconcileInterval}
	if client != nil {
		cfg.Kube = client
	}
	// hostPort and control elements are cleaned with the attachments, in
	// the node netns.
	nsFd := -1
	if o.netnsPath != "" {
		f, err := os.Open(o.netnsPath)
		if err != nil {
			logger.Error("start: open --netns", "err", err)
			return 1
		}
		defer f.Close()
		nsFd = int(f.Fd())
	}
	cfg.Cleaners = []reconcile.AttachmentCleaner{portmap.NewCleaner(nsFd), controls.NewCleaner(nsFd), netpolnft.NewCleaner(nsFd)}
	// An `nft flush ruleset` takes hostPorts, ipMasq and the martian guard
	// away; every pass brings them back from the records.
	// The node's bandwidth hierarchy, under the lock the plugin takes
	// beside the registry.
	hierLock := ""
	if o.stateRegistry != "" {
		hierLock = paths.HierarchyLockOf(o.stateRegistry)
	}
	cfg.Repairers = []reconcile.KernelRepairer{
		portmap.NewRepairer(nsFd, []string{portmap.LocalnetDir(o.stateDir)}, logger),
		podnet.NewMasqRepairer(nsFd, logger),
		shaping.NewHierarchyRepairer(nsFd, hierLock, logger),
		controls.NewRepairer(nsFd, logger),
	}
	cfg.Registry = prometheus.NewRegistry()
	if o.routesMode != nodenet.ModeOff {
		if client == nil {
			logger.Warn("-pod-routes " + string(o.routesMode) + " needs the Kubernetes API: no routes to other nodes' pods")
		} else {
			stopRoutes, err := nodenet.StartAgent(ctx, nodenet.AgentConfig{Mode: o.routesMode, Client: client,
				NodeName: o.nodeName, NetnsFd: nsFd, Logger: logger, Registerer: cfg.Registry})
			if err != nil {
				logger.Error("start", "err", err)
				return 1
			}
			defer stopRoutes()
		}
	}
	if client != nil {
		// NetworkPolicy of the networks whose config enforces it (none:
		// the controller only watches).
		stopPolicy, err := netpol.Start(ctx, netpol.Config{Client: client, CNIConfDir: o.cniConfDir, NetnsFd: nsFd,
			Registerer: cfg.Registry, Logger: logger})
		if err != nil {
			logger.Error("start", "err", err)
			return 1
		}
		defer func() { stop(); stopPolicy() }()
	}
	if client != nil && o.draDriver != "" {
		grantDir := paths.GrantDir
		if o.stateRegistry != "" {
			grantDir = paths.GrantDirOf(o.stateRegistry)
		}
		// In the background: the agent's other work does not wait for, or
		// need, DRA; on SIGTERM the driver unregisters before exit.
		draDone := make(chan struct{})
		go func() {
			defer close(draDone)
			dra.Run(ctx, dra.Config{DriverName: o.draDriver, NodeName: o.nodeName, Client: client,
				KubeletDir: o.kubeletDir, GrantDir: grantDir, CNIConfDir: o.cniConfDir, Policy: o.draPolicy, Logger: logger}, 30*time.Second)
		}()
		defer func() { stop(); <-draDone }()
	}
	srv, err := agent.New(cfg)
	if err != nil {
		logger.Error("start", "err", err)
		return 1
	}
	if err := srv.Serve(ctx); err != nil {
		logger.Error("agent stopped", "err", err)
		return 1
	}
	return 0
}
