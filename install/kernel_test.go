package install

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/testnet"
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
	f, err := os.Open(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sh, err := shaping.Open(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	eg := &shaping.Params{RateBits: 10_000_000, BurstBytes: 62500, LimitBytes: 12500, MaxQueueDelay: 10 * time.Millisecond}
	if _, err := sh.Apply(shaping.Desired{HostVeth: veth, IFB: ifb, MTU: 1500, Plan: shaping.Plan{Egress: eg}}); err != nil {
		t.Fatal(err)
	}
	before := qdiscsOf(t, n, veth)

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
	if after := qdiscsOf(t, n, veth); after != before {
		t.Errorf("the main plugin's qdiscs changed:\nbefore %s\nafter %s", before, after)
	}
}

// qdiscsOf lists a device's qdiscs as kind, handle and parent, without
// the counters that traffic (IPv6 router solicitations) moves.
func qdiscsOf(t *testing.T, n *testnet.Node, dev string) string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(n.Exec(t, "tc", "qdisc", "show", "dev", dev), "\n") {
		if f := strings.Fields(l); len(f) >= 4 {
			out = append(out, strings.Join(f[:4], " "))
		}
	}
	return strings.Join(out, "\n")
}
