package install

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

// TestUninstallKernel builds in a fresh node namespace what the plugin
// leaves on a node (a shaped standalone veth, a chained veth redirecting to
// an IFB, an orphan IFB, the nftables table) beside objects of others that
// must survive, and checks uninstall takes exactly qoscni's away while the
// pods' veths stay.
func TestUninstallKernel(t *testing.T) {
	n := testnet.NewNode(t)
	const (
		qv     = "qv0123456789ab" // standalone host veth
		qi     = "qi0123456789ab" // its IFB
		chain  = "cali1234"       // chained: the primary's veth
		qi2    = "qiaaaaaaaaaaaa" // chained attachment's IFB
		orphan = "qibbbbbbbbbbbb" // IFB without a veth
		other  = "qiother"        // not ours: wrong pattern
		keep   = "veth-keep"      // someone else's clsact and filter
	)
	n.Exec(t, "ip", "link", "add", qv, "type", "veth", "peer", "name", "p1")
	n.Exec(t, "ip", "link", "add", chain, "type", "veth", "peer", "name", "p2")
	n.Exec(t, "ip", "link", "add", keep, "type", "veth", "peer", "name", "p3")
	for _, d := range []string{qi, qi2, orphan, other} {
		n.Exec(t, "ip", "link", "add", d, "type", "ifb")
	}
	for _, d := range []string{qv, chain, keep, qi, qi2, other} {
		n.Exec(t, "ip", "link", "set", d, "up")
	}
	n.Exec(t, "tc", "qdisc", "add", "dev", qv, "root", "handle", "1:", "tbf", "rate", "10mbit", "burst", "32kb", "latency", "10ms")
	for dev, ifb := range map[string]string{qv: qi, chain: qi2, keep: other} {
		n.Exec(t, "tc", "qdisc", "add", "dev", dev, "clsact")
		n.Exec(t, "tc", "filter", "add", "dev", dev, "ingress", "prio", "1", "protocol", "all", "u32",
			"match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)
	}
	n.Exec(t, "nft", "add", "table", "inet", NftTable)
	n.Exec(t, "nft", "add", "table", "inet", "other")

	rep, err := Uninstall(context.Background(), UninstallOptions{Root: t.TempDir(), Kernel: true, NetnsPath: n.Path})
	if err != nil {
		t.Fatal(err)
	}
	links := n.Exec(t, "ip", "-o", "link", "show")
	for _, gone := range []string{qi, qi2, orphan} {
		if strings.Contains(links, gone+":") {
			t.Errorf("IFB %s left", gone)
		}
	}
	for _, kept := range []string{qv, chain, keep, other} {
		if !strings.Contains(links, kept+"@") && !strings.Contains(links, kept+":") {
			t.Errorf("%s removed, but it is not qoscni's to remove", kept)
		}
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", qv); strings.Contains(q, "tbf") || strings.Contains(q, "clsact") {
		t.Errorf("shaping left on %s: %s", qv, q)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", chain); strings.Contains(q, "clsact") {
		t.Errorf("redirect left on %s: %s", chain, q)
	}
	if f := n.Exec(t, "tc", "filter", "show", "dev", keep, "ingress"); !strings.Contains(f, other) {
		t.Errorf("someone else's redirect removed: %q", f)
	}
	tables := n.Exec(t, "nft", "list", "tables")
	if strings.Contains(tables, "inet "+NftTable+"\n") || !strings.Contains(tables, "inet other") {
		t.Errorf("nftables tables after uninstall: %s", tables)
	}
	t.Logf("report: %+v", rep.Changes)

	// Again: nothing left to do.
	rep, err = Uninstall(context.Background(), UninstallOptions{Root: t.TempDir(), Kernel: true, NetnsPath: n.Path})
	if err != nil {
		t.Fatal(err)
	}
	mustUnchanged(t, rep)
}

// TestUninstallKeepsNeighbours: a chained veth carries the main plugin's
// filter (priority 1, protocol all) and root qdisc beside the redirect
// qoscni made, with no record to go by. Uninstall takes qoscni's redirect
// and IFB and leaves the main plugin's filter, clsact and root alone.
func TestUninstallKeepsNeighbours(t *testing.T) {
	n := testnet.NewNode(t)
	const (
		veth = "cali5678"
		ifb  = "qicccccccccccc"
	)
	n.Exec(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "p1")
	n.Exec(t, "ip", "link", "set", veth, "up")
	n.Exec(t, "tc", "qdisc", "add", "dev", veth, "root", "handle", "5:", "htb")
	n.Exec(t, "tc", "qdisc", "add", "dev", veth, "clsact")
	n.Exec(t, "tc", "filter", "add", "dev", veth, "ingress", "prio", "1", "protocol", "all",
		"u32", "match", "ip", "dst", "192.0.2.99/32", "flowid", "1:5")
	sh, err := shaping.OpenNetns(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	eg := &shaping.Params{RateBits: 10_000_000, BurstBytes: 62500, LimitBytes: 12500, MaxQueueDelay: 10 * time.Millisecond}
	if _, err := sh.Apply(shaping.Desired{HostVeth: veth, IFB: ifb, MTU: 1500, Plan: shaping.Plan{Egress: eg}}); err != nil {
		t.Fatal(err)
	}
	before := n.Qdiscs(t, veth)

	if _, err := Uninstall(context.Background(), UninstallOptions{Root: t.TempDir(), Kernel: true, NetnsPath: n.Path}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Try("ip", "link", "show", ifb); err == nil {
		t.Errorf("IFB %s left", ifb)
	}
	filters := n.Exec(t, "tc", "filter", "show", "dev", veth, "ingress")
	if !strings.Contains(filters, "pref 1 u32") || !strings.Contains(filters, "c0000263/ffffffff") {
		t.Errorf("the main plugin's filter removed:\n%s", filters)
	}
	if strings.Contains(filters, "mirred") {
		t.Errorf("qoscni's redirect left:\n%s", filters)
	}
	if after := n.Qdiscs(t, veth); after != before {
		t.Errorf("the main plugin's qdiscs changed:\nbefore %s\nafter %s", before, after)
	}
}

// TestUninstallResetsRouteLocalnet: ADDs with IPv4 hostPorts turned
// route_localnet on behind two bridges (on one it was 1 already, as
// kube-proxy leaves it); uninstall turns it off only where qoscni turned
// it on, takes the localnet guards away (with the clsact qdisc it added),
// and leaves someone else's filter and clsact on the same hook alone.
func TestUninstallResetsRouteLocalnet(t *testing.T) {
	n := testnet.NewNode(t)
	root := t.TempDir()
	const (
		ours   = "brq" // route_localnet 0 before qoscni
		preset = "brk" // route_localnet 1 before qoscni
	)
	for _, br := range []string{ours, preset} {
		n.Exec(t, "ip", "link", "add", br, "type", "bridge")
		n.Exec(t, "ip", "link", "set", br, "up")
	}
	n.Exec(t, "sysctl", "-qw", "net.ipv4.conf."+preset+".route_localnet=1")
	// Someone else's filter (and clsact) on the hook the guard joins.
	n.Exec(t, "tc", "qdisc", "add", "dev", ours, "clsact")
	n.Exec(t, "tc", "filter", "add", "dev", ours, "ingress", "pref", "7", "protocol", "ip",
		"u32", "match", "ip", "dst", "192.0.2.1/32", "classid", "1:1")
	f, err := os.Open(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// What the plugin's ADD does, with the markers where it keeps them.
	m, err := portmap.New(int(f.Fd()), portmap.WithLocalnetDir(portmap.LocalnetDir(filepath.Join(root, StateDir))))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for i, br := range []string{ours, preset} {
		maps := []portmap.Mapping{{HostPort: uint16(8080 + i), ContainerPort: 80, Protocol: "tcp", PodIP: net.ParseIP("10.77.0.2").To4()}}
		if err := m.Add(portmap.Owner{ContainerID: fmt.Sprintf("c%d", i), IfName: "eth0"}, br, maps); err != nil {
			t.Fatal(err)
		}
		if got := routeLocalnet(t, n, br); got != "1" {
			t.Fatalf("route_localnet on %s after ADD: %s", br, got)
		}
	}

	rep, err := Uninstall(context.Background(), UninstallOptions{Root: root, Kernel: true, NetnsPath: n.Path})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("report: %+v", rep.Changes)
	if got := routeLocalnet(t, n, ours); got != "0" {
		t.Errorf("route_localnet on %s after uninstall: %s, want 0 (qoscni set it)", ours, got)
	}
	if got := routeLocalnet(t, n, preset); got != "1" {
		t.Errorf("route_localnet on %s after uninstall: %s, want 1 (it was 1 before qoscni)", preset, got)
	}
	for _, br := range []string{ours, preset} {
		if fl := n.Exec(t, "tc", "filter", "show", "dev", br, "ingress"); strings.Contains(fl, "bpf") {
			t.Errorf("localnet guard left on %s: %s", br, fl)
		}
	}
	if fl := n.Exec(t, "tc", "filter", "show", "dev", ours, "ingress"); !strings.Contains(fl, "u32") {
		t.Errorf("someone else's filter on %s removed: %q", ours, fl)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", ours); !strings.Contains(q, "clsact") {
		t.Errorf("someone else's clsact on %s removed: %s", ours, q)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", preset); strings.Contains(q, "clsact") {
		t.Errorf("the clsact qoscni added to %s (nothing else on it) is left: %s", preset, q)
	}

	// Again: nothing left to do.
	rep, err = Uninstall(context.Background(), UninstallOptions{Root: root, Kernel: true, NetnsPath: n.Path})
	if err != nil {
		t.Fatal(err)
	}
	mustUnchanged(t, rep)
}

func routeLocalnet(t *testing.T, n *testnet.Node, iface string) string {
	t.Helper()
	return strings.TrimSpace(n.Exec(t, "sysctl", "-n", "net.ipv4.conf."+iface+".route_localnet"))
}

// bridgeNF reads both br_netfilter sysctls of the node.
func bridgeNF(t *testing.T, n *testnet.Node) string {
	t.Helper()
	return strings.Join(strings.Fields(n.Exec(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")), " ")
}

// TestInstallBridgeNetfilter: in a node namespace where both br_netfilter
// sysctls are 0 (the module is loaded on these machines: each namespace
// has its own), a standalone install sets them to 1 and says so; again, it
// changes nothing; a chained install leaves them to the primary CNI.
func TestInstallBridgeNetfilter(t *testing.T) {
	n := testnet.NewNode(t)
	if _, err := n.Try("test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables"); err != nil {
		t.Fatal("no net.bridge.bridge-nf-call-iptables in the node namespace: br_netfilter is not loaded on this machine (modprobe br_netfilter; make deps does)")
	}
	off := func() {
		n.Exec(t, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0")
	}
	off()
	own := strings.TrimSpace(testnet.Run(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables"))
	chained, standalone := newNode(t), newNode(t)
	chained.put("10-flannel.conflist")
	install := func(host *node, mode Mode) *Report {
		t.Helper()
		rep := host.install(Options{Mode: mode, PodCIDRs: cidrs("10.244.1.0/24"), Kernel: true, NetnsPath: n.Path, ProcSys: "/proc/sys"})
		if len(rep.Warnings) > 0 {
			t.Errorf("warnings: %q", rep.Warnings)
		}
		return rep
	}

	install(chained, Chained)
	if got := bridgeNF(t, n); got != "0 0" {
		t.Errorf("chained install changed the br_netfilter sysctls to %s", got)
	}

	rep := install(standalone, Standalone)
	if got := bridgeNF(t, n); got != "1 1" {
		t.Errorf("br_netfilter sysctls after install: %s, want 1 1", got)
	}
	for _, s := range []string{"sysctl net.bridge.bridge-nf-call-iptables", "sysctl net.bridge.bridge-nf-call-ip6tables"} {
		if got := actions(rep)[s]; got != Written {
			t.Errorf("%s: %q in the report, want %q: %+v", s, got, Written, rep.Changes)
		}
	}
	if !slices.ContainsFunc(rep.Changes, func(c Change) bool { return c.Detail == "1, was 0" }) {
		t.Errorf("the report does not say what it was: %+v", rep.Changes)
	}
	rep = install(standalone, Standalone)
	if a := actions(rep)["sysctl net.bridge.bridge-nf-call-iptables"]; a != Unchanged {
		t.Errorf("second install: %q", a)
	}
	if got := strings.TrimSpace(testnet.Run(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables")); got != own {
		t.Errorf("the test's own namespace went from %s to %s", own, got)
	}
}

// TestUninstallHierarchy: a pod in the node's bandwidth hierarchy whose
// record is gone. Uninstall takes its redirects off both hooks before the
// hierarchy's IFBs go (a redirect to a deleted device would drop the pod's
// traffic), and the pod still reaches the node afterwards.
func TestUninstallHierarchy(t *testing.T) {
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	const qv = "qv00000000beef"
	n.Exec(t, "ip", "link", "add", qv, "type", "veth", "peer", "name", "eth0", "netns", pod.Name)
	n.Exec(t, "ip", "addr", "add", "10.79.0.1/24", "dev", qv)
	n.Exec(t, "ip", "link", "set", qv, "up")
	pod.Exec(t, "ip", "addr", "add", "10.79.0.2/24", "dev", "eth0")
	pod.Exec(t, "ip", "link", "set", "eth0", "up")
	sh, err := shaping.OpenNetns(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	c := shaping.Class{RequestBits: 10_000_000, CeilBits: 100_000_000, QueueBytes: 64 << 10}
	in, eg := c, c
	if _, err := sh.JoinNode(shaping.Capacity{IngressBits: 100_000_000, EgressBits: 100_000_000},
		shaping.Guarantee{Ingress: &in, Egress: &eg}, 0, qv, []net.IP{net.ParseIP("10.79.0.2")}); err != nil {
		t.Fatal(err)
	}
	pod.Exec(t, "ping", "-c", "1", "-w", "5", "10.79.0.1")

	rep, err := Uninstall(context.Background(), UninstallOptions{Root: t.TempDir(), Kernel: true, NetnsPath: n.Path})
	if err != nil {
		t.Fatal(err)
	}
	links := n.Exec(t, "ip", "-o", "link", "show")
	for _, gone := range []string{shaping.HierarchyIngressIFB, shaping.HierarchyEgressIFB} {
		if strings.Contains(links, gone+":") {
			t.Errorf("%s left", gone)
		}
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", qv); strings.Contains(q, "clsact") {
		t.Errorf("redirects left on %s: %s", qv, q)
	}
	if !strings.Contains(fmt.Sprint(rep), qv) {
		t.Errorf("report does not name %s: %v", qv, rep)
	}
	pod.Exec(t, "ping", "-c", "1", "-w", "5", "10.79.0.1")
}
