package podnet

import (
	"net"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/testnet"
)

func TestMergeIntervals(t *testing.T) {
	show := func(ivs []interval) string {
		var s []string
		for _, iv := range ivs {
			hi := "top"
			if iv.hi != nil {
				hi = net.IP(iv.hi).String()
			}
			s = append(s, net.IP(iv.lo).String()+"-"+hi)
		}
		return strings.Join(s, ",")
	}
	ivs := func(cidrs ...string) []interval {
		var out []interval
		for _, c := range cidrs {
			out = append(out, prefixInterval(cidr(c)))
		}
		return out
	}
	cases := []struct {
		in   []interval
		want string
	}{
		{nil, ""},
		{ivs("10.1.0.0/24"), "10.1.0.0-10.1.1.0"},
		// Adjacent, out of order, a duplicate and a contained prefix.
		{ivs("10.1.1.0/24", "10.1.0.0/24", "10.3.0.0/24", "10.1.0.0/24", "10.3.0.128/25"), "10.1.0.0-10.1.2.0,10.3.0.0-10.3.1.0"},
		{ivs("10.0.0.0/8", "10.5.0.0/16", "11.0.0.0/8"), "10.0.0.0-12.0.0.0"},
		{ivs("240.0.0.0/4", "250.0.0.0/8", "239.0.0.0/8"), "239.0.0.0-top"},
		{ivs("fd00:0:0:1::/64", "fd00::/64", "fd01::/64"), "fd00::-fd00:0:0:2::,fd01::-fd01:0:0:1::"},
	}
	for i, c := range cases {
		if got := show(mergeIntervals(c.in)); got != c.want {
			t.Errorf("case %d: got %s, want %s", i, got, c.want)
		}
	}
}

// podAddr is an address with its subnet's mask, as the plugin passes it.
func podAddr(s string) net.IPNet {
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return net.IPNet{IP: ip, Mask: n.Mask}
}

// masqIn opens Masq in a fresh node namespace.
func masqIn(t *testing.T) (*Masq, *testnet.Node) {
	t.Helper()
	node := testnet.NewNode(t)
	fd, err := unix.Open(node.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	m, err := NewMasq(fd)
	if err != nil {
		t.Fatal(err)
	}
	return m, node
}

func setText(t *testing.T, node *testnet.Node, set string) string {
	t.Helper()
	out := node.Exec(t, "nft", "list", "set", "inet", TableName, set)
	if i := strings.Index(out, "elements = {"); i >= 0 {
		out = out[i+len("elements = {"):]
		return strings.Join(strings.Fields(strings.NewReplacer("}", " ", ",", " ").Replace(out)), " ")
	}
	return ""
}

func TestSetClusterCIDRsKernel(t *testing.T) {
	m, node := masqIn(t)
	nets := func(cidrs ...string) []net.IPNet {
		var out []net.IPNet
		for _, c := range cidrs {
			out = append(out, cidr(c))
		}
		return out
	}

	// Before any pod: the agent creates the table, the plugin's rules
	// and multicast with it.
	if err := m.SetClusterCIDRs(nets("10.60.1.0/24", "10.60.0.0/24", "10.60.3.0/24", "fd60:0:0:1::/64")); err != nil {
		t.Fatal(err)
	}
	if got := setText(t, node, masqCluster4); got != "10.60.0.0/23 10.60.3.0/24" {
		t.Errorf("cluster4 = %q", got)
	}
	if got := setText(t, node, masqCluster6); got != "fd60:0:0:1::/64" {
		t.Errorf("cluster6 = %q", got)
	}
	if got := setText(t, node, masqSkip4); got != "224.0.0.0/4" {
		t.Errorf("skip4 = %q (multicast only)", got)
	}
	chain := node.Exec(t, "nft", "list", "table", "inet", TableName)
	for _, want := range []string{"@masq-skip-cluster4", "@masq-skip-cluster6", "@masq-skip-dst4", "@masq-src6"} {
		if !strings.Contains(chain, want) {
			t.Errorf("chain lacks %s:\n%s", want, chain)
		}
	}

	// A pod added by the plugin: its subnet goes to masq-skip-dst only.
	if err := m.Add([]net.IPNet{podAddr("10.60.9.2/24")}); err != nil {
		t.Fatal(err)
	}
	if got := setText(t, node, masqSkip4); got != "10.60.9.0/24 224.0.0.0/4" {
		t.Errorf("skip4 after Add = %q", got)
	}

	// Unchanged input is a no-op; a node leaving removes its CIDR only.
	if err := m.SetClusterCIDRs(nets("10.60.0.0/24", "10.60.1.0/24", "10.60.3.0/24", "fd60:0:0:1::/64")); err != nil {
		t.Fatal(err)
	}
	if err := m.SetClusterCIDRs(nets("10.60.3.0/24")); err != nil {
		t.Fatal(err)
	}
	if got := setText(t, node, masqCluster4); got != "10.60.3.0/24" {
		t.Errorf("cluster4 after removal = %q", got)
	}
	if got := setText(t, node, masqCluster6); got != "" {
		t.Errorf("cluster6 after removal = %q", got)
	}
	if got := setText(t, node, masqSkip4); got != "10.60.9.0/24 224.0.0.0/4" {
		t.Errorf("the plugin's skip4 must be untouched, got %q", got)
	}
	if ok, err := m.Has(net.ParseIP("10.60.9.2")); err != nil || !ok {
		t.Errorf("pod address lost: %v %v", ok, err)
	}
	if err := m.SetClusterCIDRs(nil); err != nil {
		t.Fatal(err)
	}
	if got := setText(t, node, masqCluster4); got != "" {
		t.Errorf("cluster4 after clearing = %q", got)
	}
}

// A table written by an earlier version (rules without the cluster
// lookup) is upgraded in place; pod elements stay.
func TestMasqUpgradesOldRules(t *testing.T) {
	m, node := masqIn(t)
	if err := m.Add([]net.IPNet{podAddr("10.61.0.5/24")}); err != nil {
		t.Fatal(err)
	}
	ip := net.ParseIP("10.61.0.5")
	// The rules as they were: no lookup in the cluster sets. (The
	// chain's name is an nft keyword this nft cannot quote.)
	m.conn.FlushChain(m.chain)
	for _, r := range m.rules() {
		r.Exprs = slices.Delete(r.Exprs, 6, 8)
		m.conn.AddRule(r)
	}
	if err := m.conn.Flush(); err != nil {
		t.Fatal(err)
	}
	if m.baseReady() {
		t.Fatal("old rules taken as current")
	}
	if ok, err := m.Has(ip); err != nil || !ok {
		t.Errorf("Has on old rules: %v %v", ok, err)
	}
	if err := m.SetClusterCIDRs([]net.IPNet{cidr("10.61.1.0/24")}); err != nil {
		t.Fatal(err)
	}
	chain := node.Exec(t, "nft", "list", "table", "inet", TableName)
	if strings.Count(chain, "masquerade") != 1+masqRuleNum || !strings.Contains(chain, "@masq-skip-cluster4") {
		t.Errorf("rules not upgraded:\n%s", chain)
	}
	if ok, err := m.Has(ip); err != nil || !ok {
		t.Errorf("pod element lost in the upgrade: %v %v", ok, err)
	}
	if got := setText(t, node, masqSkip4); got != "10.61.0.0/24 224.0.0.0/4" {
		t.Errorf("skip4 after upgrade = %q", got)
	}
}

// After `nft flush ruleset`, Repair brings back the chain and what the
// records' addresses call for, in one batch; the cluster CIDRs come back
// with the node watcher's next SetClusterCIDRs. On an intact table it does
// nothing, and a single lost element is found too.
func TestMasqRepair(t *testing.T) {
	m, node := masqIn(t)
	pods := []net.IPNet{podAddr("10.62.0.2/24"), podAddr("10.62.0.3/24"), podAddr("fd62::2/64")}
	if err := m.Add(pods); err != nil {
		t.Fatal(err)
	}
	cluster := []net.IPNet{cidr("10.62.8.0/24")}
	if err := m.SetClusterCIDRs(cluster); err != nil {
		t.Fatal(err)
	}
	repair := func(wantBase bool, wantAdded int) {
		t.Helper()
		base, added, err := m.Repair(pods)
		if err != nil || base != wantBase || added != wantAdded {
			t.Fatalf("Repair: base %v added %d err %v; want base %v added %d", base, added, err, wantBase, wantAdded)
		}
	}
	repair(false, 0)

	node.Exec(t, "nft", "delete", "element", "inet", TableName, masqSrc4, "{", "10.62.0.2", "}")
	repair(false, 1)
	if ok, err := m.Has(net.ParseIP("10.62.0.2")); err != nil || !ok {
		t.Fatalf("lost element not restored: %v %v", ok, err)
	}

	node.Exec(t, "nft", "flush", "ruleset")
	// 3 addresses, 2 subnets, multicast of both families.
	repair(true, 7)
	for set, want := range map[string]string{
		masqSrc4: "10.62.0.2 10.62.0.3", masqSrc6: "fd62::2",
		masqSkip4: "10.62.0.0/24 224.0.0.0/4", masqSkip6: "fd62::/64 ff00::/8",
		masqCluster4: "",
	} {
		if got := setText(t, node, set); got != want {
			t.Errorf("%s after Repair = %q, want %q", set, got, want)
		}
	}
	if err := m.SetClusterCIDRs(cluster); err != nil {
		t.Fatal(err)
	}
	if got := setText(t, node, masqCluster4); got != "10.62.8.0/24" {
		t.Errorf("cluster4 after the watcher's next pass = %q", got)
	}
	repair(false, 0)
}
