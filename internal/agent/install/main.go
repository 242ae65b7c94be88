package install

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// Main runs "install" or "uninstall" (args[0]) with their flags and returns
// the exit status: 0 done, 1 failed, 2 bad usage. It is what
// "qoscni-agent install|uninstall" calls.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: qoscni-agent install|uninstall [flags]")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	switch args[0] {
	case "install":
		return mainInstall(ctx, args[1:], stdout, stderr)
	case "uninstall":
		return mainUninstall(ctx, args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "unknown command %q: want install or uninstall\n", args[0])
		return 2
	}
}

func mainInstall(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("qoscni-agent install", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	var mode, config, podCIDRs, kubeconfig, node string
	var skipKernel bool
	fs.StringVar(&o.Root, "root", "/", "host root: every path below is inside it (the DaemonSet mounts the host at "+ContainerHostRoot+")")
	fs.StringVar(&mode, "mode", string(Standalone), "standalone (qoscni's own conflist) or chained (appended to the primary CNI's conflist)")
	fs.StringVar(&o.PluginBinary, "plugin-binary", "", "plugin executable to install (default: "+PluginBinary+" next to this program)")
	fs.StringVar(&o.CNIBinDir, "cni-bin-dir", CNIBinDir, "CNI plugin directory")
	fs.StringVar(&o.CNIConfDir, "cni-conf-dir", CNIConfDir, "CNI network config directory")
	fs.StringVar(&o.ConflistName, "conflist-name", ConflistName, "standalone network config file name")
	fs.StringVar(&config, "config", "", "standalone: conflist to write (ipam.ranges default to the node's podCIDRs); chained: qoscni's plugin entry (default: built in)")
	fs.StringVar(&o.Primary, "primary", "", "chained: primary config file name in the config dir (default: the first, the one the runtime uses)")
	fs.DurationVar(&o.WaitPrimary, "wait-primary", 0, "chained: how long to wait for the primary config to appear")
	fs.StringVar(&podCIDRs, "pod-cidrs", "", "standalone: comma-separated pod CIDRs instead of the Node's spec.podCIDRs")
	fs.StringVar(&node, "node-name", os.Getenv(NodeNameEnv), "node whose spec.podCIDRs to use (env "+NodeNameEnv+")")
	fs.StringVar(&kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig (default: in-cluster service account)")
	fs.BoolVar(&skipKernel, "skip-kernel", false, "standalone: leave the br_netfilter module ("+ModulesDir+") and its bridge-nf-call-ip(6)tables sysctls ("+ProcSysDir+") alone")
	fs.StringVar(&o.NetnsPath, "netns", "", "network namespace of the node (default: this process's)")
	fs.StringVar(&o.NodeCapacity, "node-capacity", os.Getenv(NodeCapacityEnv), "guaranteed bandwidth: the node's capacity written into qoscni's entry as nodeCapacity: "+
		"auto (95 % of the speed of the default route's device), 10G (both ways) or ingress=10G,egress=5G; \"\" = the config's own (env "+NodeCapacityEnv+")")
	fs.StringVar(&o.Ceilings, "ceilings", os.Getenv(CeilingsEnv), "the network config's ceilings written into qoscni's entry, over its own: "+
		"maxBurst=BITS,maxQueueBytes=BYTES,maxQueueDelay=DURATION,maxRequest=QUANTITY (any of them); \"\" = the config's own (env "+CeilingsEnv+")")
	fs.StringVar(&o.NetworkPolicy, "network-policy", os.Getenv(NetworkPolicyEnv), "standalone: Kubernetes NetworkPolicy enforced by qoscni (k8s) or not (off), written into qoscni's entry as its \"policy\"; "+
		"\"\" = the config's own; chained mode ignores it (env "+NetworkPolicyEnv+")")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "qoscni-agent install: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if _, _, err := ParseNodeCapacity(o.NodeCapacity); err != nil {
		fmt.Fprintln(stderr, "qoscni-agent install:", err)
		return 2
	}
	if _, err := ParseCeilings(o.Ceilings); err != nil {
		fmt.Fprintln(stderr, "qoscni-agent install:", err)
		return 2
	}
	if _, err := ParseNetworkPolicy(o.NetworkPolicy); err != nil {
		fmt.Fprintln(stderr, "qoscni-agent install:", err)
		return 2
	}
	o.Mode = Mode(mode)
	o.Kernel = !skipKernel
	if config != "" {
		data, err := os.ReadFile(config)
		if err != nil {
			fmt.Fprintln(stderr, "qoscni-agent install:", err)
			return 1
		}
		o.Config = data
	}
	if podCIDRs != "" {
		list, err := parseCIDRs(podCIDRs)
		if err != nil {
			fmt.Fprintln(stderr, "qoscni-agent install: --pod-cidrs:", err)
			return 2
		}
		o.PodCIDRs = func(context.Context) ([]string, error) { return list, nil }
	} else if node != "" {
		o.PodCIDRs = NodePodCIDRs(kubeconfig, node)
	}
	rep, err := Install(ctx, o)
	printReport(stdout, rep)
	if err != nil {
		fmt.Fprintln(stderr, "qoscni-agent install:", err)
		return 1
	}
	return 0
}

func parseCIDRs(s string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, err
		}
		out = append(out, p.Masked().String())
	}
	if len(out) == 0 {
		return nil, errors.New("no CIDR given")
	}
	return out, nil
}

func mainUninstall(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("qoscni-agent uninstall", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o UninstallOptions
	var skipKernel, wait bool
	fs.StringVar(&o.Root, "root", "/", "host root: every path below is inside it")
	fs.StringVar(&o.CNIBinDir, "cni-bin-dir", CNIBinDir, "CNI plugin directory")
	fs.StringVar(&o.CNIConfDir, "cni-conf-dir", CNIConfDir, "CNI network config directory")
	fs.StringVar(&o.StateDir, "state-dir", StateDir, "plugin attachment records (to find shaped veths)")
	fs.StringVar(&o.ConflistName, "conflist-name", ConflistName, "standalone network config file name")
	fs.BoolVar(&o.KeepBinary, "keep-binary", false, "leave the plugin binary so the runtime can still run DEL for qoscni's pods")
	fs.BoolVar(&skipKernel, "skip-kernel", false, "leave shaping, IFBs, the localnet guards, route_localnet and the nftables table "+NftTable)
	fs.StringVar(&o.NetnsPath, "netns", "", "network namespace of the node (default: this process's)")
	fs.BoolVar(&wait, "wait", false, "after a successful uninstall, sleep until SIGTERM (for a DaemonSet)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "qoscni-agent uninstall: unexpected arguments %q\n", fs.Args())
		return 2
	}
	o.Kernel = !skipKernel
	rep, err := Uninstall(ctx, o)
	printReport(stdout, rep)
	if err != nil {
		fmt.Fprintln(stderr, "qoscni-agent uninstall:", err)
		return 1
	}
	if wait {
		fmt.Fprintln(stdout, "uninstalled; waiting for SIGTERM")
		<-ctx.Done()
	}
	return 0
}

func printReport(w io.Writer, rep *Report) {
	if rep == nil {
		return
	}
	for _, c := range rep.Changes {
		line := fmt.Sprintf("%-10s %s", c.Action, c.Path)
		if c.Detail != "" {
			line += " (" + c.Detail + ")"
		}
		fmt.Fprintln(w, line)
	}
	for _, m := range rep.Warnings {
		fmt.Fprintln(w, "warning:  "+m)
	}
	if !rep.Changed() {
		fmt.Fprintln(w, "nothing changed")
	}
}
