// Command qoscni-cnitool drives a CNI network configuration list through
// libcni exactly as a container runtime does (same exec, result caching,
// capability-argument filtering and GC), so the plugin can be exercised and
// benchmarked without containerd.
//
//	qoscni-cnitool add|del|check --conflist F --netns PATH --id ID [flags]
//	qoscni-cnitool status|gc    --conflist F [--valid ID/ifname,...]
//	qoscni-cnitool bench        --conflist F --population P [--cycles K]
//
// It must run in the namespace that stands for the node, e.g. under
// `ip netns exec NODE`.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/test/bench/addel"
)

const usage = `usage: qoscni-cnitool <command> [flags]

commands:
  add     attach a container (prints the CNI result as JSON)
  del     detach a container
  check   verify an attachment
  status  ask every plugin whether it is ready for ADD
  gc      delete cached attachments not listed in --valid, then GC every plugin
  bench   time ADD and DEL at a given pod population (see -h of bench)

Run "qoscni-cnitool <command> -h" for the flags of a command.
`

// Exit codes: 1 the CNI operation failed, 2 bad usage.
const (
	exitFailed = 1
	exitUsage  = 2
)

type commonFlags struct {
	conflist string
	cniPath  string
	cacheDir string
}

func (c *commonFlags) register(fs *flag.FlagSet) {
	defPath := os.Getenv("CNI_PATH")
	if defPath == "" {
		defPath = paths.CNIBinDir
	}
	fs.StringVar(&c.conflist, "conflist", "", "network configuration list file (\"-\" reads stdin)")
	fs.StringVar(&c.cniPath, "cni-path", defPath, "plugin search path, DIR[:DIR...] (default $CNI_PATH or "+paths.CNIBinDir+")")
	fs.StringVar(&c.cacheDir, "cache-dir", "/var/lib/cni", "libcni result cache directory")
}

func (c *commonFlags) load() (*libcni.NetworkConfigList, *libcni.CNIConfig, error) {
	if c.conflist == "" {
		return nil, nil, usageError("--conflist is required")
	}
	var (
		list *libcni.NetworkConfigList
		err  error
	)
	if c.conflist == "-" {
		b, rerr := io.ReadAll(os.Stdin)
		if rerr != nil {
			return nil, nil, fmt.Errorf("read conflist from stdin: %w", rerr)
		}
		list, err = libcni.ConfListFromBytes(b)
	} else {
		list, err = libcni.ConfListFromFile(c.conflist)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("load conflist %s: %w", c.conflist, err)
	}
	paths := filepath.SplitList(c.cniPath)
	return list, libcni.NewCNIConfigWithCacheDir(paths, c.cacheDir, nil), nil
}

type usageError string

func (e usageError) Error() string { return string(e) }

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(exitUsage)
	}
	cmd, args := os.Args[1], os.Args[2:]

	ctx, cancel := signalContext()
	defer cancel()

	var err error
	switch cmd {
	case "add", "del", "check":
		err = runAttachment(ctx, cmd, args)
	case "status":
		err = runStatus(ctx, args)
	case "gc":
		err = runGC(ctx, args)
	case "bench":
		err = runBench(ctx, args)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(os.Stdout, usage)
		return
	default:
		err = usageError(fmt.Sprintf("unknown command %q", cmd))
	}
	if err == nil {
		return
	}
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(os.Stderr, "qoscni-cnitool %s: %v\n\n%s", cmd, err, usage)
		os.Exit(exitUsage)
	}
	reportError(os.Stderr, cmd, err)
	os.Exit(exitFailed)
}

// signalContext is cancelled on the first SIGINT/SIGTERM so that a running
// bench stops and cleans up; a second signal exits at once.
func signalContext() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		fmt.Fprintln(os.Stderr, "qoscni-cnitool: interrupted, cleaning up (signal again to abort)")
		cancel()
		<-sigs
		os.Exit(130)
	}()
	return ctx, cancel
}

// reportError prints the error and, when a plugin returned a structured CNI
// error, that error as JSON too, as the spec defines it.
func reportError(w io.Writer, cmd string, err error) {
	fmt.Fprintf(w, "qoscni-cnitool %s: %v\n", cmd, err)
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		if b, jerr := json.Marshal(cniErr); jerr == nil {
			fmt.Fprintf(w, "%s\n", b)
		}
	}
}

func runAttachment(ctx context.Context, cmd string, args []string) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	var (
		common  commonFlags
		netnsP  = fs.String("netns", "", "path of the pod network namespace (CNI_NETNS)")
		id      = fs.String("id", "", "container ID (CNI_CONTAINERID)")
		ifName  = fs.String("ifname", "eth0", "interface name in the pod (CNI_IFNAME)")
		cniArgs = fs.String("args", "", "CNI_ARGS as K=V;K=V; IgnoreUnknown=1 is added as runtimes do")
		capArgs = fs.String("cap-args", "", `capability args as JSON, e.g. {"portMappings":[...],"bandwidth":{...}}`)
	)
	common.register(fs)
	if err := fs.Parse(args); err != nil {
		return flagError(err)
	}
	if fs.NArg() > 0 {
		return usageError(fmt.Sprintf("unexpected arguments %q", fs.Args()))
	}
	if *id == "" {
		return usageError("--id is required")
	}
	if *netnsP == "" && cmd != "del" { // runtimes may DEL after the netns is gone
		return usageError("--netns is required")
	}
	rtArgs, err := parseCNIArgs(*cniArgs)
	if err != nil {
		return usageError(err.Error())
	}
	caps, err := parseCapArgs(*capArgs)
	if err != nil {
		return usageError(err.Error())
	}
	list, cni, err := common.load()
	if err != nil {
		return err
	}
	rt := &libcni.RuntimeConf{
		ContainerID:    *id,
		NetNS:          *netnsP,
		IfName:         *ifName,
		Args:           rtArgs,
		CapabilityArgs: caps,
	}

	switch cmd {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		b, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			return fmt.Errorf("encode result: %w", err)
		}
		fmt.Printf("%s\n", b)
		return nil
	case "del":
		return cni.DelNetworkList(ctx, list, rt)
	default:
		return cni.CheckNetworkList(ctx, list, rt)
	}
}

func runStatus(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	var common commonFlags
	common.register(fs)
	if err := fs.Parse(args); err != nil {
		return flagError(err)
	}
	list, cni, err := common.load()
	if err != nil {
		return err
	}
	if err := cni.GetStatusNetworkList(ctx, list); err != nil {
		return err
	}
	fmt.Printf("network %s: ready\n", list.Name)
	return nil
}

func runGC(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("gc", flag.ContinueOnError)
	var common commonFlags
	common.register(fs)
	valid := fs.String("valid", "", "attachments to keep, ID/ifname[,ID/ifname...]")
	if err := fs.Parse(args); err != nil {
		return flagError(err)
	}
	attachments, err := parseValid(*valid)
	if err != nil {
		return usageError(err.Error())
	}
	list, cni, err := common.load()
	if err != nil {
		return err
	}
	return cni.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: attachments})
}

func runBench(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var common commonFlags
	common.register(fs)
	var (
		population = fs.Int("population", 1, "attachments present while measuring")
		cycles     = fs.Int("cycles", 30, "measured ADD+DEL cycles")
		parallel   = fs.Int("parallel", 4, "concurrent ADD/DEL while filling and draining (not timed)")
		ifName     = fs.String("ifname", "eth0", "interface name in the pods")
		prefix     = fs.String("prefix", "qcb", "name prefix of the pod namespaces (PID and index are appended)")
		cniArgs    = fs.String("args", "", "extra CNI_ARGS for every pod, K=V;K=V")
		capArgs    = fs.String("cap-args", "", "capability args (JSON) for every pod")
		hostPorts  = fs.Int("hostport-base", 0, "give pod i the TCP hostPort N+i (0: no hostPorts)")
		label      = fs.String("label", "", "name printed for this run (default: network name)")
		format     = fs.String("format", "text", "output: text, tsv or json")
		quiet      = fs.Bool("quiet", false, "no progress logs on stderr")
		settle     = fs.Duration("settle", 0, "pause between filling and the measured cycles")
	)
	// A private cache keeps the benchmark away from a real runtime's cache.
	fs.Lookup("cache-dir").DefValue = "a temporary directory"
	common.cacheDir = ""
	if err := fs.Parse(args); err != nil {
		return flagError(err)
	}
	if *format != "text" && *format != "tsv" && *format != "json" {
		return usageError("--format must be text, tsv or json")
	}
	if *hostPorts < 0 || (*hostPorts > 0 && *hostPorts+*population+*cycles > 65536) {
		return usageError(fmt.Sprintf("--hostport-base %d: the pods' ports must fit below 65536", *hostPorts))
	}
	rtArgs, err := parseCNIArgs(*cniArgs)
	if err != nil {
		return usageError(err.Error())
	}
	if len(rtArgs) > 0 && rtArgs[0][0] == "IgnoreUnknown" {
		rtArgs = rtArgs[1:] // the bench adds it itself
	}
	caps, err := parseCapArgs(*capArgs)
	if err != nil {
		return usageError(err.Error())
	}
	if common.cacheDir == "" {
		dir, err := os.MkdirTemp("", "qoscni-bench-cache-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		common.cacheDir = dir
	}
	list, cni, err := common.load()
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if *quiet {
		log = slog.New(slog.DiscardHandler)
	}
	res, err := addel.Run(ctx, addel.Options{
		CNI:          cni,
		Conf:         list,
		Population:   *population,
		Cycles:       *cycles,
		Parallel:     *parallel,
		IfName:       *ifName,
		NetnsPrefix:  *prefix,
		Args:         rtArgs,
		CapArgs:      caps,
		HostPortBase: *hostPorts,
		Settle:       *settle,
		Log:          log,
	})
	if err != nil {
		return err
	}
	name := *label
	if name == "" {
		name = res.Network
	}
	return printBench(os.Stdout, *format, name, res)
}

func printBench(w io.Writer, format, name string, r addel.Result) error {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }
	switch format {
	case "tsv":
		// label population cycles add_p50 add_p90 add_p99 del_p50 del_p90 del_p99 (ms)
		_, err := fmt.Fprintf(w, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", name, r.Population, r.Cycles,
			ms(r.Add.P50), ms(r.Add.P90), ms(r.Add.P99), ms(r.Del.P50), ms(r.Del.P90), ms(r.Del.P99))
		return err
	case "json":
		type stats struct {
			N                                 int
			MinMs, P50Ms, P90Ms, P99Ms, MaxMs float64
		}
		conv := func(s addel.Stats) stats {
			f := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
			return stats{s.N, f(s.Min), f(s.P50), f(s.P90), f(s.P99), f(s.Max)}
		}
		return json.NewEncoder(w).Encode(map[string]any{
			"label": name, "network": r.Network, "population": r.Population, "cycles": r.Cycles,
			"add": conv(r.Add), "del": conv(r.Del),
			"fillSeconds": r.Fill.Seconds(), "drainSeconds": r.Drain.Seconds(),
		})
	default:
		_, err := fmt.Fprintf(w, "%s: population %d, %d cycles (fill %s, drain %s)\n"+
			"  ADD ms  p50 %s  p90 %s  p99 %s  (min %s max %s)\n"+
			"  DEL ms  p50 %s  p90 %s  p99 %s  (min %s max %s)\n",
			name, r.Population, r.Cycles, r.Fill.Round(time.Millisecond), r.Drain.Round(time.Millisecond),
			ms(r.Add.P50), ms(r.Add.P90), ms(r.Add.P99), ms(r.Add.Min), ms(r.Add.Max),
			ms(r.Del.P50), ms(r.Del.P90), ms(r.Del.P99), ms(r.Del.Min), ms(r.Del.Max))
		return err
	}
}

func flagError(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return usageError(err.Error())
}

// parseCNIArgs turns "K=V;K=V" into libcni's pairs. Like containerd it puts
// IgnoreUnknown=1 first, so plugins that do not know a key (the reference
// plugins reject K8S_POD_* otherwise) still accept the call.
func parseCNIArgs(s string) ([][2]string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var out [][2]string
	hasIgnore := false
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--args: %q is not K=V", kv)
		}
		if strings.EqualFold(k, "IgnoreUnknown") {
			hasIgnore = true
		}
		out = append(out, [2]string{k, v})
	}
	if !hasIgnore {
		out = append([][2]string{{"IgnoreUnknown", "1"}}, out...)
	}
	return out, nil
}

func parseCapArgs(s string) (map[string]interface{}, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var m map[string]interface{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return nil, fmt.Errorf("--cap-args: not a JSON object: %w", err)
	}
	return m, nil
}

// parseValid reads "ID/ifname,ID/ifname" for GC.
func parseValid(s string) ([]types.GCAttachment, error) {
	var out []types.GCAttachment
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		id, ifName, ok := strings.Cut(item, "/")
		if !ok || id == "" || ifName == "" {
			return nil, fmt.Errorf("--valid: %q is not CONTAINERID/ifname", item)
		}
		out = append(out, types.GCAttachment{ContainerID: id, IfName: ifName})
	}
	return out, nil
}
