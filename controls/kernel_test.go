package controls

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// world is a node namespace routing between a pod and a peer standing for
// another machine, both on veths:
//
//	pod 10.77.0.2/fd77::2 --- node 10.77.0.1/fd77::1 | 10.78.0.1/fd78::1 --- peer 10.78.0.2/fd78::2
type world struct {
	node, pod, peer *testnet.NS
	m               *Manager
	owner           Owner
	ips             []net.IP
}

var (
	pod4, pod6   = net.ParseIP("10.77.0.2"), net.ParseIP("fd77::2")
	peer4, peer6 = "10.78.0.2", "fd78::2"
)

func newWorld(t *testing.T) *world {
	t.Helper()
	testnet.RequireRoot(t)
	w := &world{node: testnet.NewNS(t, "qn"), pod: testnet.NewNS(t, "qp"), peer: testnet.NewNS(t, "qc"),
		owner: Owner{ContainerID: testnet.Unique("c"), IfName: "eth0", PodNamespace: "default", PodName: "web"},
		ips:   []net.IP{pod4, pod6}}
	n := w.node.Name
	for _, s := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		w.node.Exec(t, "sysctl", "-qw", s)
	}
	for _, side := range []struct {
		ns                  *testnet.NS
		dev, n4, n6, a4, a6 string
	}{{w.pod, "topod", "10.77.0.1", "fd77::1", "10.77.0.2", "fd77::2"}, {w.peer, "topeer", "10.78.0.1", "fd78::1", peer4, peer6}} {
		testnet.Run(t, "ip", "-n", n, "link", "add", side.dev, "type", "veth", "peer", "name", "eth0", "netns", side.ns.Name)
		testnet.Run(t, "ip", "-n", n, "addr", "add", side.n4+"/24", "dev", side.dev)
		testnet.Run(t, "ip", "-n", n, "addr", "add", side.n6+"/64", "dev", side.dev, "nodad")
		testnet.Run(t, "ip", "-n", n, "link", "set", side.dev, "up")
		testnet.Run(t, "ip", "-n", side.ns.Name, "addr", "add", side.a4+"/24", "dev", "eth0")
		testnet.Run(t, "ip", "-n", side.ns.Name, "addr", "add", side.a6+"/64", "dev", "eth0", "nodad")
		testnet.Run(t, "ip", "-n", side.ns.Name, "link", "set", "eth0", "up")
		testnet.Run(t, "ip", "-n", side.ns.Name, "route", "add", "default", "via", side.n4)
		testnet.Run(t, "ip", "-n", side.ns.Name, "-6", "route", "add", "default", "via", side.n6)
	}
	// IPv6 forwarding needs neighbour discovery and router state on both
	// veths first; the first packets are lost until then.
	for _, a := range []string{peer4, peer6} {
		for i := 0; ; i++ {
			if _, err := w.pod.Try("ping", "-c1", "-W1", a); err == nil {
				break
			} else if i == 10 {
				t.Fatalf("pod cannot reach %s: %v", a, err)
			}
		}
	}
	m, err := New(w.nsFd(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	w.m = m
	return w
}

// nsFd is the node namespace, open until the test ends.
func (w *world) nsFd(t *testing.T) int {
	t.Helper()
	h, err := netns.GetFromPath(w.node.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return int(h)
}

func (w *world) set(t *testing.T, c *state.Controls) {
	t.Helper()
	if err := w.m.Set(w.owner, w.ips, c); err != nil {
		t.Fatalf("Set %+v: %v", c, err)
	}
	if err := w.m.Check(w.owner, w.ips, c); err != nil {
		t.Fatalf("Check right after Set: %v", err)
	}
}

// flood sends small UDP packets from one namespace to addr:port as fast as
// it can for d; it returns the packets sent and those that reached the
// receiving namespace, per second. Arrivals are counted by an nftables
// counter at the receiver's prerouting hook, not by a socket: on a busy
// two-CPU machine the flood starves a reader, and what its socket buffer
// drops is no part of the limit.
func flood(t *testing.T, from, to *testnet.NS, addr string, d time.Duration) (sent, got float64) {
	t.Helper()
	port := fmt.Sprint(40000 + time.Now().UnixNano()%20000)
	table := testnet.Unique("qflood")
	to.Exec(t, "nft", "add", "table", "inet", table)
	defer to.Exec(t, "nft", "delete", "table", "inet", table)
	to.Exec(t, "nft", "add", "chain", "inet", table, "c", "{ type filter hook prerouting priority -400; }")
	to.Exec(t, "nft", "add", "rule", "inet", table, "c", "udp", "dport", port, "counter")
	// Two senders, so that one is sending while the other is preempted.
	var n atomic.Int64
	errs := make(chan error, 2)
	end := time.Now().Add(d)
	for range 2 {
		go func() {
			errs <- testnet.InNS(from.Path, func() error {
				c, err := net.Dial("udp", net.JoinHostPort(addr, port))
				if err != nil {
					return err
				}
				defer c.Close()
				msg := []byte("x")
				for time.Now().Before(end) {
					if _, err := c.Write(msg); err == nil {
						n.Add(1)
					}
				}
				return nil
			})
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	out := to.Exec(t, "nft", "list", "chain", "inet", table, "c")
	var arrived int
	if i := strings.Index(out, "counter packets "); i < 0 {
		t.Fatalf("no counter in\n%s", out)
	} else if _, err := fmt.Sscanf(out[i:], "counter packets %d", &arrived); err != nil {
		t.Fatal(err)
	}
	return float64(n.Load()) / d.Seconds(), float64(arrived) / d.Seconds()
}

// TestPacketRate: a pod limited to 1000 packets/s gets 950 to 1050 under a
// flood, in each direction and family, the drops are counted per pod and
// control, and removing the limit lifts it at once.
func TestPacketRate(t *testing.T) {
	w := newWorld(t)
	// A bucket of 100 packets (100 ms at the rate): a flood on a shared
	// machine is not offered without pauses, and a bucket smaller than a
	// pause loses that pause's share. Over 4 s it adds at most 25/s.
	rate := &state.ControlDirection{PacketRate: 1000, PacketBurst: 100}
	w.set(t, &state.Controls{Ingress: rate, Egress: rate})
	for _, tc := range []struct {
		name     string
		from, to *testnet.NS
		addr     string
		kind     Kind
	}{
		{"ingress v4", w.peer, w.pod, pod4.String(), IngressPackets},
		{"egress v4", w.pod, w.peer, peer4, EgressPackets},
		{"ingress v6", w.peer, w.pod, pod6.String(), IngressPackets},
		{"egress v6", w.pod, w.peer, peer6, EgressPackets},
	} {
		before, err := w.m.Read(w.ips)
		if err != nil {
			t.Fatal(err)
		}
		sent, got := flood(t, tc.from, tc.to, tc.addr, 4*time.Second)
		after, err := w.m.Read(w.ips)
		if err != nil {
			t.Fatal(err)
		}
		met := after.Offered[tc.kind] - before.Offered[tc.kind]
		t.Logf("%s: sent %.0f/s, received %.0f/s, met by the rate %d, dropped %d", tc.name, sent, got, met, after.Count[tc.kind]-before.Count[tc.kind])
		if sent < 5000 {
			t.Fatalf("%s: the flood reached only %.0f packets/s, too few to test a limit of 1000", tc.name, sent)
		}
		if got < 950 || got > 1050 {
			t.Errorf("%s: %.0f packets/s received, want 950 to 1050", tc.name, got)
		}
		d := after.Count[tc.kind] - before.Count[tc.kind]
		if float64(d) < (sent-got)*4*0.9 {
			t.Errorf("%s: %s counted %d drops, want about %.0f", tc.name, tc.kind, d, (sent-got)*4)
		}
		// What the rate met is what passed and what it dropped: the
		// receiver counts the passed ones (a few packets of slack for
		// the ones in flight when the counters were read).
		if passed := int64(met) - int64(d); passed < int64(got*4)-50 || passed > int64(got*4)+50 {
			t.Errorf("%s: %s met %d packets and dropped %d, so %d passed; the receiver counted %.0f", tc.name, tc.kind, met, d, passed, got*4)
		}
		if !after.Present[tc.kind] {
			t.Errorf("%s: %s not present in the reading", tc.name, tc.kind)
		}
	}
	w.set(t, nil)
	if _, got := flood(t, w.peer, w.pod, pod4.String(), time.Second); got < 5000 {
		t.Errorf("limit removed: still %.0f packets/s", got)
	}
}

// dial opens n TCP connections from one namespace to addr:port and
// returns them and the error of the first that failed.
func dial(t *testing.T, from *testnet.NS, addr string, port, n int) ([]net.Conn, error) {
	t.Helper()
	var conns []net.Conn
	var failed error
	if err := testnet.InNS(from.Path, func() error {
		for range n {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(addr, fmt.Sprint(port)), 2*time.Second)
			if err != nil {
				failed = err
				return nil
			}
			conns = append(conns, c)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	return conns, failed
}

// waitAccepted waits up to 5 s until n connections at once are accepted,
// then closes them.
func waitAccepted(t *testing.T, from *testnet.NS, addr string, port, n int) {
	t.Helper()
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		conns, err := dial(t, from, addr, port, n)
		for _, c := range conns {
			c.Close()
		}
		if err == nil {
			t.Logf("%d connections accepted again %v after the others closed", n, time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("closed connections still count after 5 s: %d of %d accepted (%v)", len(conns), n, err)
		}
	}
}

func alive(conns []net.Conn) error {
	for i, c := range conns {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
		buf := make([]byte, 4)
		if _, err := c.Read(buf); err != nil {
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
	}
	return nil
}

// TestMaxConnections: a pod limited to 10 connections gets the 11th
// refused (a TCP reset) while the 10 stay up, accepting and opening; only
// TCP counts; closed connections leave the count; the limit lifts live.
func TestMaxConnections(t *testing.T) {
	w := newWorld(t)
	ten := &state.ControlDirection{MaxConnections: 10}
	w.set(t, &state.Controls{Ingress: ten, Egress: ten})
	for _, tc := range []struct {
		name         string
		server, from *testnet.NS
		addr         string
		kind         Kind
	}{
		{"ingress v4", w.pod, w.peer, pod4.String(), IngressConnections},
		{"egress v4", w.peer, w.pod, peer4, EgressConnections},
		{"ingress v6", w.pod, w.peer, pod6.String(), IngressConnections},
		{"ingress from the node (output hook)", w.pod, w.node, pod4.String(), IngressConnections},
	} {
		port := testnet.EchoTCP(t, tc.server, net.JoinHostPort(tc.addr, "0"))
		conns, err := dial(t, tc.from, tc.addr, port, 11)
		if len(conns) != 10 || !errors.Is(err, unix.ECONNREFUSED) {
			t.Errorf("%s: %d connections opened, then %v; want 10, then refused", tc.name, len(conns), err)
		}
		if err := alive(conns); err != nil {
			t.Errorf("%s: the 10 allowed connections: %v", tc.name, err)
		}
		// Only TCP connections count, as with Calico: a ping still passes.
		if out, err := tc.from.Try("ping", "-c", "1", "-W", "2", tc.addr); err != nil {
			t.Errorf("%s: ping at the bound: %v %s", tc.name, err, out)
		}
		got, err := w.m.Read(w.ips)
		if err != nil || !got.Present[tc.kind] || got.Count[tc.kind] == 0 {
			t.Errorf("%s: %s refused count %d (%v)", tc.name, tc.kind, got.Count[tc.kind], err)
		}
		for _, c := range conns {
			c.Close()
		}
		// Closed connections leave the count once both ends have closed
		// (the server's goroutine answers the FIN within milliseconds):
		// ten new ones are accepted again, with nothing flushed.
		waitAccepted(t, tc.from, tc.addr, port, 10)
	}
	w.set(t, nil)
	port := testnet.EchoTCP(t, w.pod, net.JoinHostPort(pod4.String(), "0"))
	if conns, err := dial(t, w.peer, pod4.String(), port, 12); err != nil || len(conns) != 12 {
		t.Errorf("limit removed: %d connections, %v", len(conns), err)
	}
}

// tosOf sends one UDP datagram with ECN ECT(0) from the pod to the peer
// and returns the TOS (traffic class) byte the peer received.
func tosOf(t *testing.T, w *world, v6 bool) byte {
	t.Helper()
	network, addr, level, opt, recv := "udp4", peer4, unix.IPPROTO_IP, unix.IP_TOS, unix.IP_RECVTOS
	if v6 {
		network, addr, level, opt, recv = "udp6", peer6, unix.IPPROTO_IPV6, unix.IPV6_TCLASS, unix.IPV6_RECVTCLASS
	}
	var rc *net.UDPConn
	if err := testnet.InNS(w.peer.Path, func() error {
		a, _ := net.ResolveUDPAddr(network, net.JoinHostPort(addr, "0"))
		c, err := net.ListenUDP(network, a)
		if err != nil {
			return err
		}
		rc = c
		raw, _ := c.SyscallConn()
		var serr error
		raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, recv, 1) })
		return serr
	}); err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if err := testnet.InNS(w.pod.Path, func() error {
		c, err := net.DialUDP(network, nil, rc.LocalAddr().(*net.UDPAddr))
		if err != nil {
			return err
		}
		defer c.Close()
		raw, _ := c.SyscallConn()
		var serr error
		raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, 0x02) })
		if serr != nil {
			return serr
		}
		_, err = c.Write([]byte("dscp"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	rc.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf, oob := make([]byte, 16), make([]byte, 128)
	_, oobn, _, _, err := rc.ReadMsgUDP(buf, oob)
	if err != nil {
		t.Fatalf("no datagram from the pod (a bad checksum is dropped): %v", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) == 0 {
		t.Fatalf("no TOS control message: %v", err)
	}
	return msgs[0].Data[0]
}

// TestDSCP: the pod's egress carries its code point on the wire, ECN bits
// kept and the IPv4 checksum right (the peer's kernel drops a datagram
// with a bad one), and removing the annotation lifts the marking.
func TestDSCP(t *testing.T) {
	w := newWorld(t)
	for _, d := range []uint8{46, 10, 63} {
		w.set(t, &state.Controls{DSCP: &d})
		for _, v6 := range []bool{false, true} {
			if got, want := tosOf(t, w, v6), d<<2|0x02; got != want {
				t.Errorf("DSCP %d, v6 %v: TOS 0x%02x on the wire, want 0x%02x", d, v6, got, want)
			}
		}
	}
	w.set(t, nil)
	if got := tosOf(t, w, false); got != 0x02 {
		t.Errorf("marking removed: TOS 0x%02x, want 0x02", got)
	}
}

// TestOwnershipAndRepair: DEL of a former owner leaves the new owner's
// elements, GC removes an unknown owner's, and after `nft flush ruleset`
// Check reports the loss and Set restores it.
func TestOwnershipAndRepair(t *testing.T) {
	w := newWorld(t)
	c := &state.Controls{Egress: &state.ControlDirection{PacketRate: 500, PacketBurst: 10, MaxConnections: 3}}
	w.set(t, c)
	old := Owner{ContainerID: "gone", IfName: "eth0"}
	if err := w.m.Del(old, w.ips); err != nil {
		t.Fatal(err)
	}
	if err := w.m.Check(w.owner, w.ips, c); err != nil {
		t.Fatalf("a stale DEL removed the owner's controls: %v", err)
	}
	if n, err := w.m.GC(func(o Owner) bool { return o.Same(w.owner) }); err != nil || n != 0 {
		t.Fatalf("GC of valid elements: %d, %v", n, err)
	}
	w.node.Exec(t, "nft", "flush", "ruleset")
	if err := w.m.Check(w.owner, w.ips, c); err == nil {
		t.Fatal("Check passed after nft flush ruleset")
	}
	w.set(t, c)
	out := w.node.Exec(t, "nft", "list", "table", "inet", "qoscni")
	if !strings.Contains(out, "limit rate over 500/second") || !strings.Contains(out, "ct count over 3") {
		t.Errorf("nft does not list the pod's controls:\n%s", out)
	}
	if n, err := w.m.GC(func(Owner) bool { return false }); err != nil || n != 6 {
		t.Fatalf("GC of a gone pod removed %d elements (%v), want 6 (packet rate, its drops and connections x 2 families)", n, err)
	}
	if err := w.m.Del(w.owner, w.ips); err != nil {
		t.Fatalf("DEL after GC: %v", err)
	}
}

// TestRuleCountConstant: pods add elements, never rules: the table holds
// as many rules with 300 pods as with one (a DSCP code point in use adds
// its chain once, whatever the number of pods marking with it).
func TestRuleCountConstant(t *testing.T) {
	w := newWorld(t)
	ef := uint8(46)
	c := &state.Controls{Ingress: &state.ControlDirection{PacketRate: 1000, PacketBurst: 5},
		Egress: &state.ControlDirection{MaxConnections: 100}, DSCP: &ef}
	rules := func() int {
		t.Helper()
		have, err := w.m.Raw.RuleComments(w.m.l.table.Name)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, r := range have {
			n += len(r)
		}
		return n
	}
	w.set(t, c)
	one := rules()
	for i := 1; i < 300; i++ {
		o := Owner{ContainerID: fmt.Sprintf("c%d", i), IfName: "eth0"}
		ips := []net.IP{net.IPv4(10, 77, byte(1+i/250), byte(i%250)), net.ParseIP(fmt.Sprintf("fd77::1:%x", i))}
		if err := w.m.Set(o, ips, c); err != nil {
			t.Fatal(err)
		}
	}
	if n := rules(); n != one {
		t.Errorf("%d rules with 300 pods, %d with one", n, one)
	}
	els, err := w.m.Raw.DumpElems(w.m.l.table.Name, "pkt-ingress4")
	if err != nil || len(els) != 300 {
		t.Errorf("pkt-ingress4 holds %d elements (%v), want 300", len(els), err)
	}
	t.Logf("%d rules (%d of them the chain of DSCP 46) for 1 and for 300 pods", one, len(dscpRules(ef)))
}

// TestUpgradeFromV1: a node whose table holds the rules and elements of
// the release before the drop sets (rules tagged v1, a packet rate's
// element with its limit before its counter) gets the new rules and sets
// at the next Set, Check reports the old element until then, and the
// drops are counted after.
func TestUpgradeFromV1(t *testing.T) {
	w := newWorld(t)
	// The v1 base: this release's rules without the drop sets' lookups,
	// tagged v1, and no drop sets.
	conn, err := w.m.NFT()
	if err != nil {
		t.Fatal(err)
	}
	l := w.m.l
	conn.AddTable(l.table)
	for _, s := range l.sets {
		if !strings.HasPrefix(s.Name, "pkt-drop-") {
			if err := conn.AddSet(s, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	conn.AddChain(l.prerouting)
	conn.AddChain(l.output)
	for _, r := range l.rules() {
		var ex []expr.Any
		for _, e := range r.exprs {
			if lk, ok := e.(*expr.Lookup); ok && strings.HasPrefix(lk.SetName, "pkt-drop-") {
				continue
			}
			ex = append(ex, e)
		}
		conn.AddRule(&nftables.Rule{Table: l.table, Chain: r.chain, Exprs: ex,
			UserData: userdata.AppendString(nil, userdata.TypeComment, "qoscni-controls/v1: "+r.comment)})
	}
	if err := conn.Flush(); err != nil {
		t.Fatal(err)
	}
	old := &nfraw.Batch{}
	if err := old.Add("qoscni", "pkt-ingress4", nfraw.Element{Key: pod4.To4(), Comment: nfraw.EncodeOwner(w.owner),
		Exprs: []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: 1000, Unit: expr.LimitTimeSecond, Burst: 100, Over: true}, &expr.Counter{}}}); err != nil {
		t.Fatal(err)
	}
	if err := w.m.Raw.Send(old); err != nil {
		t.Fatal(err)
	}
	c := &state.Controls{Ingress: &state.ControlDirection{PacketRate: 1000, PacketBurst: 100}}
	if err := w.m.Check(w.owner, w.ips, c); err == nil {
		t.Fatal("Check passed on the previous release's rules and element")
	}
	w.set(t, c)
	if out := w.node.Exec(t, "nft", "list", "table", "inet", "qoscni"); strings.Contains(out, "qoscni-controls/v1") {
		t.Errorf("v1 rules left after Set:\n%s", out)
	}
	_, got := flood(t, w.peer, w.pod, pod4.String(), 2*time.Second)
	r, err := w.m.Read(w.ips)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Present[IngressPackets] || r.Count[IngressPackets] == 0 || r.Offered[IngressPackets] <= r.Count[IngressPackets] {
		t.Errorf("after the upgrade: %+v (%.0f/s received), want drops counted and fewer than met", r, got)
	}
}
