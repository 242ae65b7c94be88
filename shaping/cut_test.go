package shaping

import (
	"net"
	"strings"
	"testing"
)

func TestHierLeafQueue(t *testing.T) {
	for _, c := range []struct {
		name       string
		queue      uint64
		mtu        int
		limit, cut uint64
	}{
		{"a budget of two GSO packets takes them whole", peakQueueBelow, 1500, peakQueueBelow, 0},
		{"a deep budget is the FIFO", 1 << 20, 1500, 1 << 20, 0},
		{"57 Mbit/s for 10 ms cuts above a quarter of it", 71_250, 1500, 71_250, 17_812},
		{"a short budget cuts at two frames", 12_000, 1500, 12_000, 3028},
		{"jumbo frames: two of them", 60_000, 9000, 60_000, 18_028},
		{"tiny MTU: never below the IFB's frame, queue two cuts", 2000, 576, 3028, 1514},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := hierLeafQueue(c.queue, c.mtu)
			if got.limit != c.limit || got.cut != c.cut {
				t.Errorf("hierLeafQueue(%d, %d) = %+v, want limit %d cut %d", c.queue, c.mtu, got, c.limit, c.cut)
			}
		})
	}
}

// A leaf whose budget is shorter than two GSO packets gets a TBF that
// cuts them, at a rate that never holds a packet back; a longer budget a
// plain FIFO; a rejoin swaps one for the other and leaves nothing behind.
func TestHierarchyLeafCutsGSO(t *testing.T) {
	h := newHierNode(t, 1)
	h.ensure(t, 1_000_000_000)
	p := h.pods[0]
	const minor = 0x42
	ips := []net.IP{p.ip, p.ip6}
	guarantee := func(queue uint64) Guarantee {
		c := &Class{RequestBits: 100_000_000, CeilBits: 1_000_000_000, BurstBytes: 16 << 10, CburstBytes: 16 << 10, QueueBytes: queue}
		return Guarantee{Ingress: c, Egress: c}
	}
	join := func(queue uint64) {
		t.Helper()
		if err := h.s.Join(guarantee(queue).Member(minor, p.veth, ips), h.states(t)); err != nil {
			t.Fatal(err)
		}
	}
	// drift is what CHECK and the repairer see of the member.
	drift := func(queue uint64) []string {
		t.Helper()
		states, err := h.s.ReadHierarchies(true)
		if err != nil {
			t.Fatal(err)
		}
		diff, err := h.s.DiffMember(guarantee(queue), minor, p.veth, ips, states)
		if err != nil {
			t.Fatal(err)
		}
		return diff
	}
	leafOf := func(ifb string) (kinds []string) {
		t.Helper()
		qs, err := h.s.qdiscs()
		if err != nil {
			t.Fatal(err)
		}
		l, err := h.s.nl.LinkByName(ifb)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qs {
			if q.Ifindex != uint32(l.Attrs().Index) || q.Parent != 0x10042 {
				continue
			}
			kinds = append(kinds, q.Kind)
		}
		return kinds
	}
	for _, ifb := range []string{HierarchyIngressIFB, HierarchyEgressIFB} {
		if l := h.node.Exec(t, "ip", "-o", "link", "show", ifb); !strings.Contains(l, "mtu 1500 ") {
			t.Errorf("%s: %s", ifb, l)
		}
	}

	join(64 << 10)
	for _, ifb := range []string{HierarchyIngressIFB, HierarchyEgressIFB} {
		out := h.node.Exec(t, "tc", "qdisc", "show", "dev", ifb)
		if !strings.Contains(out, "qdisc tbf 1042: parent 1:42 rate 8796Gbit") || strings.Contains(out, "qdisc bfifo 42:") {
			t.Errorf("64 KiB budget on %s: want the cutting TBF only:\n%s", ifb, out)
		}
		if k := leafOf(ifb); len(k) != 1 || k[0] != "tbf" {
			t.Errorf("leaf of 1:42 on %s read back as %v", ifb, k)
		}
	}
	// The cut size and queue as the kernel keeps them: tcdump reads the
	// TBF's 64-bit rate and its limit.
	qs, err := h.s.qdiscs()
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, q := range qs {
		if q.Handle == cutHandle(minor) {
			found++
			if q.Tbf == nil || q.Tbf.Parms == nil || q.Tbf.Parms.Limit != 64<<10 {
				t.Errorf("cutting TBF: %+v", q.Tbf)
			}
		}
	}
	if found != 2 {
		t.Errorf("%d cutting TBFs, want one per IFB", found)
	}

	if d := drift(64 << 10); len(d) != 0 {
		t.Errorf("drift right after the join: %q", d)
	}
	// A node upgraded from a version without cutting leaves has FIFOs
	// there; a leaf deleted by hand leaves HTB's default. Both are drift,
	// and a rejoin (the repairer's) puts the TBF back.
	h.node.Exec(t, "tc", "qdisc", "replace", "dev", HierarchyEgressIFB, "parent", "1:42", "handle", "42:", "bfifo", "limit", "73728")
	h.node.Exec(t, "tc", "qdisc", "del", "dev", HierarchyIngressIFB, "parent", "1:42")
	if d := drift(64 << 10); len(d) != 2 || !strings.Contains(strings.Join(d, "\n"), "qoscni.out: the queue of class 1:42 of qvh0 is bfifo of 73728 bytes, want tbf of 65536 bytes") {
		t.Errorf("drift of a FIFO and a missing leaf: %q", d)
	}
	join(64 << 10)
	if d := drift(64 << 10); len(d) != 0 {
		t.Errorf("drift after the rejoin: %q", d)
	}
	if d := drift(256 << 10); len(d) != 2 {
		t.Errorf("a longer budget wants the FIFO back both ways: %q", d)
	}

	join(256 << 10)
	if d := drift(256 << 10); len(d) != 0 {
		t.Errorf("drift after joining with a FIFO: %q", d)
	}
	for _, ifb := range []string{HierarchyIngressIFB, HierarchyEgressIFB} {
		out := h.node.Exec(t, "tc", "qdisc", "show", "dev", ifb)
		if !strings.Contains(out, "qdisc bfifo 42: parent 1:42 limit 256Kb") || strings.Contains(out, "tbf 1042:") {
			t.Errorf("256 KiB budget on %s: want the FIFO only:\n%s", ifb, out)
		}
	}
	join(64 << 10)
	for _, ifb := range []string{HierarchyIngressIFB, HierarchyEgressIFB} {
		if k := leafOf(ifb); len(k) != 1 || k[0] != "tbf" {
			t.Errorf("back to a short budget on %s: leaves %v", ifb, k)
		}
	}
	if err := h.s.LeaveNode(minor, p.veth, []net.IP{p.ip, p.ip6}); err != nil {
		t.Fatal(err)
	}
	for _, ifb := range []string{HierarchyIngressIFB, HierarchyEgressIFB} {
		if out := h.node.Exec(t, "tc", "qdisc", "show", "dev", ifb); strings.Contains(out, "1:42") {
			t.Errorf("after leaving, %s still has the leaf:\n%s", ifb, out)
		}
	}
}
