package netpolnft

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/testnet"
)

// world is testnet.Routed with pods a, b and c and a Manager in its node.
type world struct {
	*testnet.Routed
	m *Manager
}

func a4(pod string) netip.Addr { return netip.MustParseAddr(fmt.Sprintf("10.81.%d.2", pod[0]-'a')) }
func a6(pod string) netip.Addr { return netip.MustParseAddr(fmt.Sprintf("fd81:%x::2", pod[0]-'a')) }

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{Routed: testnet.NewRouted(t, "a", "b", "c")}
	h, err := netns.GetFromPath(w.Node.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	if w.m, err = New(int(h)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.m.Close() })
	return w
}

// probe is one connection attempt and what should come of it.
type probe struct {
	from, to string // pods, or "node"
	v6       bool
	udp      bool
	port     int
	want     bool
}

func (w *world) check(t *testing.T, what string, probes ...probe) {
	t.Helper()
	ps := make([]testnet.Probe, len(probes))
	for i, p := range probes {
		ps[i] = testnet.Probe{From: p.from, To: p.to, V6: p.v6, UDP: p.udp, Port: p.port}
	}
	var bad []string
	for i, got := range w.Run(ps) {
		if got != probes[i].want {
			bad = append(bad, fmt.Sprintf("%s: got %v, want %v", ps[i], got, probes[i].want))
		}
	}
	if len(bad) > 0 {
		t.Errorf("%s:\n%s\n%s", what, strings.Join(bad, "\n"), w.Node.Exec(t, "nft", "list", "table", "inet", "qoscni"))
	}
}

func (w *world) apply(t *testing.T, s *State) int {
	t.Helper()
	n, err := w.m.Apply(s)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return n
}

// TestPendingThenOpen: pending addresses are closed both ways, to other
// pods and to the node, but the node reaches them; Apply with the pod
// ready opens them; another owner's pending element stays on Unpend.
func TestPendingThenOpen(t *testing.T) {
	w := newWorld(t)
	if repaired, err := w.m.EnsureBase(); err != nil || !repaired {
		t.Fatalf("first EnsureBase: repaired %v, %v", repaired, err)
	}
	if repaired, err := w.m.EnsureBase(); err != nil || repaired {
		t.Fatalf("second EnsureBase: repaired %v, %v", repaired, err)
	}
	owner := Owner{ContainerID: testnet.Unique("c"), IfName: "eth0", PodNamespace: "default", PodName: "a"}
	if err := w.m.Pend(owner, []netip.Addr{a4("a"), a6("a")}); err != nil {
		t.Fatal(err)
	}
	w.check(t, "a pending",
		probe{from: "a", to: "b", port: 80}, probe{from: "b", to: "a", port: 80},
		probe{from: "a", to: "b", v6: true, port: 80}, probe{from: "b", to: "a", v6: true, udp: true, port: 81},
		probe{from: "a", to: "node", port: 80}, probe{from: "b", to: "node", port: 80, want: true},
		probe{from: "node", to: "a", port: 80, want: true}, probe{from: "node", to: "a", v6: true, port: 80, want: true},
		probe{from: "b", to: "c", port: 80, want: true})
	other := Owner{ContainerID: testnet.Unique("c"), IfName: "eth0"}
	if err := w.m.Unpend(other, []netip.Addr{a4("a")}); err != nil {
		t.Fatal(err)
	}
	if p, err := w.m.Pending(); err != nil || !p[a4("a")].Same(owner) || !p[a6("a")].Same(owner) {
		t.Fatalf("after another owner's Unpend: %v, %v", p, err)
	}
	// Ready for another attachment (the address's previous pod): stays.
	w.apply(t, &State{Ready: map[netip.Addr]Owner{a4("a"): other, a6("a"): other}})
	w.check(t, "ready for another owner", probe{from: "a", to: "b", port: 80})
	w.apply(t, &State{Ready: map[netip.Addr]Owner{a4("a"): owner, a6("a"): owner}})
	w.check(t, "a ready, no policy", probe{from: "a", to: "b", port: 80, want: true}, probe{from: "b", to: "a", v6: true, udp: true, port: 81, want: true})
	if p, err := w.m.Pending(); err != nil || len(p) != 0 {
		t.Fatalf("pending after Apply: %v, %v", p, err)
	}
	// Unpend by the owner removes exactly its elements.
	if err := w.m.Pend(owner, []netip.Addr{a4("a")}); err != nil {
		t.Fatal(err)
	}
	if err := w.m.Unpend(owner, []netip.Addr{a4("a"), a6("a")}); err != nil {
		t.Fatal(err)
	}
	if p, err := w.m.Pending(); err != nil || len(p) != 0 {
		t.Fatalf("pending after the owner's Unpend: %v, %v", p, err)
	}
}

// TestIsolation: ingress by identity and port, egress by address block
// with an exception and a port range, both families; the node always
// reaches its pods; a connection open before a stricter policy keeps
// flowing; a second Apply of the same state changes nothing.
func TestIsolation(t *testing.T) {
	w := newWorld(t)
	const identA, identC = 7, 9
	idents := map[netip.Addr]uint32{a4("a"): identA, a6("a"): identA, a4("c"): identC, a6("c"): identC, a4("b"): 8, a6("b"): 8}
	tcp80 := L4{6, 6, 80, 80}
	s := &State{
		Idents:          idents,
		IngressIsolated: map[netip.Addr]struct{}{a4("b"): {}, a6("b"): {}},
		IngressIdent: []IdentAllow{
			{Pod: a4("b"), Ident: identA, L4: tcp80},
			{Pod: a6("b"), Ident: identA, L4: tcp80},
			{Pod: a6("b"), Ident: identC, L4: AnyL4},
		},
		EgressIsolated: map[netip.Addr]struct{}{a4("a"): {}},
		EgressBlock: []BlockAllow{
			// 10.81.0.0/16 except 10.81.2.0/24 (c), TCP 80 and 8000-8100.
			{Pod: a4("a"), PeerLo: netip.MustParseAddr("10.81.0.0"), PeerHi: netip.MustParseAddr("10.81.1.255"), L4: L4{6, 6, 80, 80}},
			{Pod: a4("a"), PeerLo: netip.MustParseAddr("10.81.0.0"), PeerHi: netip.MustParseAddr("10.81.1.255"), L4: L4{6, 6, 8000, 8100}},
			{Pod: a4("a"), PeerLo: netip.MustParseAddr("10.81.3.0"), PeerHi: netip.MustParseAddr("10.81.255.255"), L4: L4{6, 6, 80, 80}},
		},
	}
	if n := w.apply(t, s); n == 0 {
		t.Fatal("the first Apply changed nothing")
	}
	w.check(t, "policies",
		// b's ingress: a on TCP 80 (v4 and v6), c anything on v6 only.
		probe{from: "a", to: "b", port: 80, want: true},
		probe{from: "a", to: "b", v6: true, port: 80, want: true},
		probe{from: "a", to: "b", v6: true, port: 81},
		probe{from: "a", to: "b", v6: true, udp: true, port: 80},
		probe{from: "c", to: "b", port: 80},
		probe{from: "c", to: "b", v6: true, port: 81, want: true},
		probe{from: "c", to: "b", v6: true, udp: true, port: 8050, want: true},
		probe{from: "node", to: "b", port: 81, want: true},
		// a's egress (v4 only): b by block on 80 and 8050; c excepted.
		probe{from: "a", to: "b", port: 8050, want: false}, // b's ingress allows only 80 from a
		probe{from: "a", to: "c", port: 80},
		probe{from: "a", to: "c", v6: true, port: 80, want: true}, // v6: a not egress-isolated
		probe{from: "a", to: "node", port: 81},                    // a's egress covers the node's address too
		probe{from: "a", to: "node", port: 80, want: true},
		// c is not isolated; b's egress is open; replies flow.
		probe{from: "b", to: "a", port: 81, want: true},
		probe{from: "b", to: "c", udp: true, port: 81, want: true},
		probe{from: "c", to: "a", port: 8050, want: true},
	)
	if n := w.apply(t, s); n != 0 {
		t.Errorf("a second Apply of the same state changed %d elements", n)
	}
	// nft can show all of it (a rule it cannot decode aborts nft list).
	listing := w.Node.Exec(t, "nft", "list", "ruleset")
	for _, c := range []string{"chain np-in-7 ", "chain np-out-9 ", "chain np-in-8 "} {
		if !strings.Contains(listing, c) {
			t.Errorf("no %q in\n%s", c, listing)
		}
	}
	// Open a connection a -> b:80, then close b to everything.
	c, err := w.Dial("a", "tcp", a4("b").String(), 80)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !testnet.Echo(c) {
		t.Fatal("no echo on the open connection")
	}
	s.IngressIdent = nil
	w.apply(t, s)
	if !testnet.Echo(c) {
		t.Error("the connection opened before the stricter policy stopped")
	}
	w.check(t, "b closed", probe{from: "a", to: "b", port: 80}, probe{from: "c", to: "b", v6: true, port: 81})
	// No isolation left: everything open, the sets empty.
	w.apply(t, &State{})
	w.check(t, "no policies", probe{from: "a", to: "c", port: 80, want: true}, probe{from: "c", to: "b", port: 81, want: true})
	if listing := w.Node.Exec(t, "nft", "list", "ruleset"); strings.Contains(listing, "np-in-") || strings.Contains(listing, "np-out-") {
		t.Errorf("identity chains left after an empty Apply:\n%s", listing)
	}
	for _, v6 := range []bool{false, true} {
		for _, kind := range allowanceKinds {
			if els, err := w.m.Raw.DumpElems("qoscni", name(kind, v6)); err != nil || len(els) != 0 {
				t.Errorf("set %s after an empty Apply: %d elements, %v", name(kind, v6), len(els), err)
			}
		}
	}
}

// TestRepair: a flushed ruleset (chains and sets gone) comes back with
// EnsureBase, and Apply writes the elements again.
func TestRepair(t *testing.T) {
	w := newWorld(t)
	s := &State{IngressIsolated: map[netip.Addr]struct{}{a4("b"): {}}}
	w.apply(t, s)
	w.check(t, "b isolated", probe{from: "a", to: "b", port: 80})
	w.Node.Exec(t, "nft", "flush", "ruleset")
	w.check(t, "after the flush", probe{from: "a", to: "b", port: 80, want: true})
	if n := w.apply(t, s); n != 1 {
		t.Errorf("Apply after the flush changed %d elements, want 1", n)
	}
	w.check(t, "repaired", probe{from: "a", to: "b", port: 80})
}

// TestUpgradeFromV1: a node whose table holds the previous release's
// policy (rules tagged v1, no hash sets, every allowance by identity in
// the interval set) is rewritten by one Apply of the same state: the
// rules and sets of this release, each allowance in the set of its shape,
// and the same verdicts before and after.
func TestUpgradeFromV1(t *testing.T) {
	w := newWorld(t)
	const identA, identC = 3, 5
	s := &State{
		Idents:          map[netip.Addr]uint32{a4("a"): identA, a4("c"): identC, a4("b"): 4},
		IngressIsolated: map[netip.Addr]struct{}{a4("b"): {}},
		IngressIdent: []IdentAllow{
			{Pod: a4("b"), Ident: identA, L4: AnyL4},
			{Pod: a4("b"), Ident: identC, L4: L4{6, 6, 80, 80}},
			{Pod: a4("b"), Ident: identC, L4: L4{17, 17, 0, 65535}},
		},
	}
	// The v1 table: this release's fixed rules and sets without the hash
	// sets, tagged v1; identity chains of one interval lookup.
	v1 := func(c string) []byte { return userdata.AppendString(nil, userdata.TypeComment, "qoscni-netpol/v1: "+c) }
	conn, err := w.m.NFT()
	if err != nil {
		t.Fatal(err)
	}
	l := w.m.l
	conn.AddTable(l.table)
	ids := map[string]uint32{}
	for _, set := range l.sets {
		if slices.Contains([]string{setIngIDAny, setIngIDProto, setIngIDPort, setEgrIDAny, setEgrIDProto, setEgrIDPort}, strings.TrimRight(set.Name, "46")) {
			continue
		}
		if err := conn.AddSet(set, nil); err != nil {
			t.Fatal(err)
		}
		ids[set.Name] = set.ID
	}
	chains := map[string]*nftables.Chain{}
	for _, c := range append(slices.Clone(l.chains), l.forward, l.input) {
		conn.AddChain(c)
		chains[c.Name] = c
	}
	for _, r := range l.rules() {
		for _, e := range r.exprs {
			if lk, ok := e.(*expr.Lookup); ok {
				lk.SetID = ids[lk.SetName]
			}
		}
		conn.AddRule(&nftables.Rule{Table: l.table, Chain: chains[r.chain], Exprs: r.exprs, UserData: v1(r.comment)})
	}
	for _, id := range s.identities() {
		c := conn.AddChain(&nftables.Chain{Name: identChain(id, false), Table: l.table})
		conn.AddRule(&nftables.Rule{Table: l.table, Chain: c, UserData: v1("by identity4"), Exprs: append(nfproto(false),
			loadAddr(false, false, reg0),
			&expr.Immediate{Register: reg0 + 1, Data: identBytes(id)},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg0 + 2},
			&expr.Payload{DestRegister: reg0 + 3, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Lookup{SourceRegister: reg0, SetName: "np-iid4", SetID: ids["np-iid4"]},
			&expr.Verdict{Kind: expr.VerdictReturn})})
		conn.AddRule(&nftables.Rule{Table: l.table, Chain: c, UserData: v1("deny"), Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}}})
	}
	var old []nftables.SetElement
	for _, a := range s.IngressIdent {
		pod, _ := addrKey(a.Pod)
		id := identBytes(a.Ident)
		old = append(old, toSetElements([]nfraw.Element{{
			Key:    concat(pod, id, []byte{a.L4.ProtoLo}, port(a.L4.PortLo)),
			KeyEnd: concat(pod, id, []byte{a.L4.ProtoHi}, port(a.L4.PortHi)),
		}}, false)...)
	}
	peers := map[netip.Addr]uint32{a4("a"): identA, a4("c"): identC, a4("b"): 4}
	for a, id := range peers {
		key, _ := addrKey(a)
		if err := conn.SetAddElements(l.set("np-peer-in4"), []nftables.SetElement{{Key: key, VerdictData: &expr.Verdict{Kind: expr.VerdictGoto, Chain: identChain(id, false)}}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := conn.SetAddElements(l.set("np-iid4"), old); err != nil {
		t.Fatal(err)
	}
	key, _ := addrKey(a4("b"))
	if err := conn.SetAddElements(l.set("np-iiso4"), []nftables.SetElement{{Key: key}}); err != nil {
		t.Fatal(err)
	}
	if err := conn.Flush(); err != nil {
		t.Fatalf("write the v1 table: %v", err)
	}
	verdicts := []probe{
		{from: "a", to: "b", port: 81, want: true},
		{from: "a", to: "b", udp: true, port: 8050, want: true},
		{from: "c", to: "b", port: 80, want: true},
		{from: "c", to: "b", port: 81},
		{from: "c", to: "b", udp: true, port: 81, want: true},
	}
	w.check(t, "the v1 table", verdicts...)
	w.apply(t, s)
	w.check(t, "after the upgrade", verdicts...)
	listing := w.Node.Exec(t, "nft", "list", "table", "inet", "qoscni")
	if strings.Contains(listing, "qoscni-netpol/v1") {
		t.Errorf("v1 rules left:\n%s", listing)
	}
	for set, want := range map[string]int{"np-iid4": 0, "np-iida4": 1, "np-iidp4": 1, "np-iidx4": 1} {
		if els, err := w.m.Raw.DumpElems("qoscni", set); err != nil || len(els) != want {
			t.Errorf("%s holds %d elements (%v), want %d", set, len(els), err, want)
		}
	}
	if n := w.apply(t, s); n != 0 {
		t.Errorf("a second Apply changed %d", n)
	}
}
