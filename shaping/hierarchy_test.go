package shaping

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/testnet"
)

// hierNode is a node netns with an uplink to a "network" namespace and
// pods routed behind /30s on their own veths, as a routed CNI wires them.
type hierNode struct {
	node *testnet.Node
	net  *testnet.NS
	s    *Shaper
	pods []*hierPod
}

type hierPod struct {
	ns   *testnet.NS
	veth string
	ip   net.IP
	ip6  net.IP
}

func newHierNode(t *testing.T, pods int) *hierNode {
	t.Helper()
	n := testnet.NewNode(t)
	h := &hierNode{node: n, net: testnet.NewNS(t, "qx")}
	// No duplicate address detection: link-local addresses would stay
	// tentative for seconds, and neighbour discovery with them.
	n.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0")
	h.net.Exec(t, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
	n.Exec(t, "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "eth0", "netns", h.net.Name)
	n.Exec(t, "ip", "addr", "add", "10.70.0.1/24", "dev", "upl0")
	n.Exec(t, "ip", "-6", "addr", "add", "fd70::1/64", "dev", "upl0", "nodad")
	n.Exec(t, "ip", "link", "set", "upl0", "up")
	h.net.Exec(t, "ip", "addr", "add", "10.70.0.2/24", "dev", "eth0")
	h.net.Exec(t, "ip", "-6", "addr", "add", "fd70::2/64", "dev", "eth0", "nodad")
	h.net.Exec(t, "ip", "link", "set", "eth0", "up")
	h.net.Exec(t, "ip", "route", "add", "10.71.0.0/16", "via", "10.70.0.1")
	h.net.Exec(t, "ip", "-6", "route", "add", "fd71::/32", "via", "fd70::1")
	for i := 0; i < pods; i++ {
		p := &hierPod{ns: n.NewPod(t), veth: fmt.Sprintf("qvh%d", i),
			ip: net.ParseIP(fmt.Sprintf("10.71.%d.2", i)).To4(), ip6: net.ParseIP(fmt.Sprintf("fd71:0:%d::2", i))}
		p.ns.Exec(t, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
		n.Exec(t, "ip", "link", "add", p.veth, "type", "veth", "peer", "name", "eth0", "netns", p.ns.Name)
		n.Exec(t, "ip", "addr", "add", fmt.Sprintf("10.71.%d.1/30", i), "dev", p.veth)
		n.Exec(t, "ip", "-6", "addr", "add", fmt.Sprintf("fd71:0:%d::1/64", i), "dev", p.veth, "nodad")
		n.Exec(t, "ip", "link", "set", p.veth, "up")
		p.ns.Exec(t, "ip", "addr", "add", p.ip.String()+"/30", "dev", "eth0")
		p.ns.Exec(t, "ip", "-6", "addr", "add", p.ip6.String()+"/64", "dev", "eth0", "nodad")
		p.ns.Exec(t, "ip", "link", "set", "eth0", "up")
		p.ns.Exec(t, "ip", "route", "add", "default", "via", fmt.Sprintf("10.71.%d.1", i))
		p.ns.Exec(t, "ip", "-6", "route", "add", "default", "via", fmt.Sprintf("fd71:0:%d::1", i))
		h.pods = append(h.pods, p)
	}
	var err error
	if h.s, err = OpenNetns(n.Path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.s.Close)
	return h
}

func (h *hierNode) ensure(t *testing.T, capBits uint64) {
	t.Helper()
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		if err := h.s.EnsureHierarchy(d, capBits/8, 0); err != nil {
			t.Fatal(err)
		}
	}
}

func (h *hierNode) states(t *testing.T) map[HierDirection]HierState {
	t.Helper()
	out, err := h.s.ReadHierarchies(false)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// join admits a pod with the same leaf both ways and updates the
// best-effort share, as the plugin does.
func (h *hierNode) join(t *testing.T, p *hierPod, minor uint16, leaf HierLeaf, capBits uint64) {
	t.Helper()
	m := HierMember{Minor: minor, HostVeth: p.veth, IPs: []net.IP{p.ip, p.ip6}, Ingress: &leaf, Egress: &leaf}
	if err := h.s.Join(m, h.states(t)); err != nil {
		t.Fatal(err)
	}
	h.rebalance(t, capBits)
}

func (h *hierNode) rebalance(t *testing.T, capBits uint64) {
	t.Helper()
	for d, st := range h.states(t) {
		if err := h.s.SetBestEffort(d, capBits/8, st.ReservedBytes); err != nil {
			t.Fatal(err)
		}
	}
}

func leafFor(requestBits, capBits uint64, prio uint8) HierLeaf {
	return HierLeaf{RateBytes: requestBits / 8, CeilBytes: capBits / 8, Prio: prio,
		BurstBytes: 16 << 10, CburstBytes: 16 << 10, QueueBytes: max(capBits/8/100, 64<<10)}
}

// The hash key is where the kernel reads it: go-tc packs the u32
// selector one byte off (hashSel), and this is what says the workaround
// still holds.
func TestHierarchyHashKey(t *testing.T) {
	h := newHierNode(t, 0)
	h.ensure(t, 100_000_000)
	for _, c := range []struct {
		dev  string
		want []string
	}{
		{HierarchyIngressIFB, []string{"hash mask ff000000 at 19", "hash mask ff000000 at 39"}},
		{HierarchyEgressIFB, []string{"hash mask ff000000 at 15", "hash mask ff000000 at 23"}},
	} {
		out := h.node.Exec(t, "tc", "filter", "show", "dev", c.dev)
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: no %q in\n%s", c.dev, w, out)
			}
		}
		if !strings.Contains(out, "divisor 256") {
			t.Errorf("%s: no 256-bucket table:\n%s", c.dev, out)
		}
	}
	// Idempotent: a second pass adds nothing.
	before := h.node.Exec(t, "tc", "filter", "show", "dev", HierarchyIngressIFB)
	h.ensure(t, 100_000_000)
	if after := h.node.Exec(t, "tc", "filter", "show", "dev", HierarchyIngressIFB); after != before {
		t.Errorf("second EnsureHierarchy changed the filters:\n%s\n---\n%s", before, after)
	}
}

// classStats reads each class's byte counter from tc's text (its JSON
// output has no classes).
func classStats(t *testing.T, n *testnet.Node, dev string) map[string]uint64 {
	t.Helper()
	m := map[string]uint64{}
	class := ""
	for _, l := range strings.Split(n.Exec(t, "tc", "-s", "class", "show", "dev", dev), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) >= 3 && f[0] == "class":
			class = f[2]
		case len(f) >= 2 && f[0] == "Sent" && class != "":
			b, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				t.Fatalf("class %s counter %q: %v", class, l, err)
			}
			m[class] = b
		}
	}
	return m
}

// A member's packets are classified into its own class both ways, over
// IPv4 and IPv6; it can move between best effort and guaranteed in place;
// Leave removes every trace of it, and nothing else.
func TestHierarchyJoinMoveLeave(t *testing.T) {
	h := newHierNode(t, 2)
	const capBits = 100_000_000
	h.ensure(t, capBits)
	a, b := h.pods[0], h.pods[1]
	h.join(t, a, 0x10, leafFor(0, capBits, 1), capBits)
	h.join(t, b, 0x11, leafFor(30_000_000, capBits, 0), capBits)

	st := h.states(t)
	for d, s := range st {
		if s.CapacityBytes != capBits/8 || s.ReservedBytes != 30_000_000/8 {
			t.Errorf("%s: capacity %d reserved %d", d, s.CapacityBytes, s.ReservedBytes)
		}
		if c := s.Classes[0x10]; c.Guaranteed || c.Leaf.CeilBytes != capBits/8 || c.Leaf.Prio != 1 {
			t.Errorf("%s: best-effort member read back as %+v", d, c)
		}
		if c := s.Classes[0x11]; !c.Guaranteed || c.Leaf.RateBytes != 30_000_000/8 || c.Leaf.Prio != 0 {
			t.Errorf("%s: guaranteed member read back as %+v", d, c)
		}
	}
	// Each hook holds its own redirect (u32 shares hash tables between
	// the hooks of one clsact: distinct priorities keep them apart).
	for hook, want := range map[string]string{"egress": HierarchyIngressIFB, "ingress": HierarchyEgressIFB} {
		f := h.node.Exec(t, "tc", "filter", "show", "dev", a.veth, hook)
		other := HierarchyEgressIFB
		if want == HierarchyEgressIFB {
			other = HierarchyIngressIFB
		}
		if !strings.Contains(f, "device "+want+")") || strings.Contains(f, "device "+other+")") {
			t.Errorf("%s hook of %s:\n%s", hook, a.veth, f)
		}
	}
	for _, p := range []*hierPod{a, b} {
		p.ns.Exec(t, "ping", "-c", "3", "-i", "0.2", "-w", "10", "10.70.0.2")
		p.ns.Exec(t, "ping", "-6", "-c", "3", "-i", "0.2", "-w", "10", "fd70::2")
	}
	for _, dev := range []string{HierarchyIngressIFB, HierarchyEgressIFB} {
		cs := classStats(t, h.node, dev)
		// 6 echo requests or replies of 98 B (IPv4) and 118 B (IPv6).
		for _, cl := range []string{"1:10", "1:11"} {
			if cs[cl] < 3*98+3*118 {
				t.Errorf("%s: class %s saw %d bytes, want both families' pings: %v", dev, cl, cs[cl], cs)
			}
		}
	}

	// a gets a guarantee: it moves under 1:1, its entries follow.
	h.join(t, a, 0x10, leafFor(20_000_000, capBits, 2), capBits)
	st = h.states(t)
	if c := st[IntoPods].Classes[0x10]; !c.Guaranteed || c.Leaf.RateBytes != 20_000_000/8 || st[IntoPods].ReservedBytes != 50_000_000/8 {
		t.Errorf("after the move: %+v, reserved %d", c, st[IntoPods].ReservedBytes)
	}
	before := classStats(t, h.node, HierarchyEgressIFB)["1:10"]
	a.ns.Exec(t, "ping", "-c", "2", "-i", "0.2", "-w", "10", "10.70.0.2")
	if after := classStats(t, h.node, HierarchyEgressIFB)["1:10"]; after <= before {
		t.Errorf("after the move a's packets do not reach its class (%d -> %d bytes)", before, after)
	}

	// By the addresses (entries deleted by handle), then again without
	// them (found in a dump), as the collector of unclaimed classes does.
	if err := h.s.Leave(0x10, a.veth, []net.IP{a.ip, a.ip6}); err != nil {
		t.Fatal(err)
	}
	if err := h.s.Leave(0x10, a.veth, nil); err != nil {
		t.Fatalf("second Leave: %v", err)
	}
	h.rebalance(t, capBits)
	for _, dev := range []string{HierarchyIngressIFB, HierarchyEgressIFB} {
		out := h.node.Exec(t, "tc", "filter", "show", "dev", dev) + h.node.Exec(t, "tc", "class", "show", "dev", dev) +
			h.node.Exec(t, "tc", "qdisc", "show", "dev", dev)
		if strings.Contains(out, "1:10 ") || strings.Contains(out, "flowid 1:10") || strings.Contains(out, "qdisc bfifo 10:") {
			t.Errorf("%s keeps a trace of the member that left:\n%s", dev, out)
		}
		if !strings.Contains(out, "flowid 1:11") {
			t.Errorf("%s lost the other member:\n%s", dev, out)
		}
	}
	if q := h.node.Exec(t, "tc", "qdisc", "show", "dev", a.veth); strings.Contains(q, "clsact") {
		t.Errorf("%s keeps its clsact: %s", a.veth, q)
	}
	if st := h.states(t); st[OutOfPods].ReservedBytes != 30_000_000/8 {
		t.Errorf("reserved after Leave: %d", st[OutOfPods].ReservedBytes)
	}
}

// Three pods saturate one direction at once: a requests 60 % of the
// capacity, b 20 %, c nothing. Each gets its request and together they use
// the capacity. (The bench measures this at 100 Mbit/s and 1 Gbit/s
// against the reference plugin; this is the correctness check, at a rate
// a loaded CI machine keeps.)
func TestHierarchyGuarantees(t *testing.T) {
	h := newHierNode(t, 3)
	if _, err := exec.LookPath("iperf3"); err != nil {
		if os.Getenv(testnet.RequireRootEnv) != "" {
			t.Fatal("iperf3 not installed")
		}
		t.Skip("iperf3 not installed")
	}
	const capBits = 40_000_000
	h.ensure(t, capBits)
	requests := []uint64{capBits * 6 / 10, capBits * 2 / 10, 0}
	for i, p := range h.pods {
		h.join(t, p, MinMinor+uint16(i), leafFor(requests[i], capBits, 1), capBits)
	}
	ports := []int{5311, 5312, 5313}
	for _, port := range ports {
		cmd := exec.Command("ip", "netns", "exec", h.net.Name, "iperf3", "-s", "-p", fmt.Sprint(port), "--bind", "0.0.0.0")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	}
	for _, port := range ports {
		waitListening(t, h.net, port)
	}
	for _, dir := range []struct {
		name    string
		reverse bool
	}{{"out-of-pods", false}, {"into-pods", true}} {
		t.Run(dir.name, func(t *testing.T) {
			got := make([]float64, len(h.pods))
			var wg sync.WaitGroup
			for i, p := range h.pods {
				wg.Add(1)
				go func() {
					defer wg.Done()
					got[i] = iperfOnPort(t, p.ns, "10.70.0.2", ports[i], 5, dir.reverse)
				}()
			}
			wg.Wait()
			total := got[0] + got[1] + got[2]
			t.Logf("a %.1f (requests %.0f), b %.1f (requests %.0f), c %.1f, total %.1f of %.0f Mbit/s",
				got[0]/1e6, float64(requests[0])/1e6, got[1]/1e6, float64(requests[1])/1e6, got[2]/1e6, total/1e6, float64(capBits)/1e6)
			for i := 0; i < 2; i++ {
				if got[i] < 0.9*float64(requests[i]) {
					t.Errorf("pod %d got %.1f Mbit/s, under 0.9 of its request %.0f", i, got[i]/1e6, float64(requests[i])/1e6)
				}
			}
			if total < 0.9*capBits || total > 1.05*capBits {
				t.Errorf("total %.1f Mbit/s, want 0.9 to 1.05 of the capacity %.0f", total/1e6, float64(capBits)/1e6)
			}
		})
	}
}

func waitListening(t *testing.T, ns *testnet.NS, port int) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if out, err := ns.Try("ss", "-ltn", fmt.Sprintf("sport = :%d", port)); err == nil && strings.Contains(out, fmt.Sprint(port)) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %d in %s", port, ns.Name)
}

// iperfOnPort is testnet.Iperf3Rate against a server on another port.
func iperfOnPort(t *testing.T, ns *testnet.NS, server string, port, secs int, reverse bool) float64 {
	args := []string{"netns", "exec", ns.Name, "iperf3", "-c", server, "-p", fmt.Sprint(port), "-t", fmt.Sprint(secs), "-O", "1", "-J"}
	if reverse {
		args = append(args, "-R")
	}
	out, err := exec.Command("ip", args...).Output()
	if err != nil {
		t.Errorf("iperf3 client: %v: %s", err, out)
		return 0
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		t.Errorf("iperf3 output: %v", err)
	}
	return r.End.SumReceived.BitsPerSecond
}

func guaranteeOf(requestBits, ceilBits uint64, prio Priority) Guarantee {
	c := Class{RequestBits: requestBits, CeilBits: ceilBits, Priority: prio, BurstBytes: 16 << 10, CburstBytes: 16 << 10, QueueBytes: 64 << 10}
	in, eg := c, c
	return Guarantee{Ingress: &in, Egress: &eg}
}

// Admission counts every pod's request once: a pod that does not fit is
// refused with code 101 and nothing changes; a reshape of a pod already
// in does not count its own request twice; leaving gives it back.
func TestJoinNodeAdmission(t *testing.T) {
	h := newHierNode(t, 3)
	capacity := Capacity{IngressBits: 100_000_000, EgressBits: 100_000_000}
	a, b, c := h.pods[0], h.pods[1], h.pods[2]
	ma, err := h.s.JoinNode(capacity, guaranteeOf(60_000_000, 100_000_000, PriorityNormal), 0, a.veth, []net.IP{a.ip})
	if err != nil || ma < MinMinor || ma > MaxMinor {
		t.Fatalf("join a: minor %#x, %v", ma, err)
	}
	mb, err := h.s.JoinNode(capacity, guaranteeOf(30_000_000, 100_000_000, PriorityHigh), 0, b.veth, []net.IP{b.ip})
	if err != nil || mb < MinMinor || mb > MaxMinor || mb == ma {
		t.Fatalf("join b: minor %#x (a has %#x), %v", mb, ma, err)
	}
	before := h.node.Exec(t, "tc", "class", "show", "dev", HierarchyIngressIFB) + h.node.Exec(t, "tc", "qdisc", "show", "dev", c.veth)
	_, err = h.s.JoinNode(capacity, guaranteeOf(20_000_000, 100_000_000, PriorityNormal), 0, c.veth, []net.IP{c.ip})
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != ErrBandwidthUnavailable {
		t.Fatalf("a request over the capacity: %v, want CNI error %d", err, ErrBandwidthUnavailable)
	}
	for _, want := range []string{"node capacity 100Mbit/s", "90Mbit/s already reserved", "requests 20Mbit/s"} {
		if !strings.Contains(cerr.Msg, want) {
			t.Errorf("refusal %q does not say %q", cerr.Msg, want)
		}
	}
	after := h.node.Exec(t, "tc", "class", "show", "dev", HierarchyIngressIFB) + h.node.Exec(t, "tc", "qdisc", "show", "dev", c.veth)
	if before != after {
		t.Errorf("a refused join changed the node:\n%s\n---\n%s", before, after)
	}
	// c without a request joins best effort; the best-effort share is
	// what requests leave, plus the 1 kbit/s floor (bestEffortShare).
	if _, err := h.s.JoinNode(capacity, guaranteeOf(0, 50_000_000, PriorityLow), 0, c.veth, []net.IP{c.ip}); err != nil {
		t.Fatal(err)
	}
	if out := h.node.Exec(t, "tc", "class", "show", "dev", HierarchyEgressIFB, "classid", "1:2"); !strings.Contains(out, "rate 10001Kbit") {
		t.Errorf("best-effort share with 90 of 100 Mbit/s reserved: %s", out)
	}
	// a reshapes from 60 to 70: it fits, its own 60 are not counted.
	if m, err := h.s.JoinNode(capacity, guaranteeOf(70_000_000, 100_000_000, PriorityNormal), ma, a.veth, []net.IP{a.ip}); err != nil || m != ma {
		t.Fatalf("reshape a to 70M: %#x %v", m, err)
	}
	if err := h.s.LeaveNode(mb, b.veth, []net.IP{b.ip}); err != nil {
		t.Fatal(err)
	}
	st, err := h.s.ReadHierarchy(IntoPods)
	if err != nil {
		t.Fatal(err)
	}
	if st.ReservedBytes != 70_000_000/8 || len(st.Classes) != 2 {
		t.Errorf("after b left: reserved %d, classes %v", st.ReservedBytes, st.Classes)
	}
	if out := h.node.Exec(t, "tc", "class", "show", "dev", HierarchyIngressIFB, "classid", "1:2"); !strings.Contains(out, "rate 30001Kbit") {
		t.Errorf("best-effort share with 70 of 100 Mbit/s reserved: %s", out)
	}
}
