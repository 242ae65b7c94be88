package shaping

import (
	"net"
	"testing"
)

func TestBestEffortShareReadsBack(t *testing.T) {
	const capBytes = 12_500_000
	for _, reserved := range []uint64{0, 1, 125, 7_500_000, capBytes - 126, capBytes - 125, capBytes - 1} {
		share := bestEffortShare(capBytes, reserved)
		got, exact := reservedOf(capBytes, share)
		if !exact || got != reserved {
			t.Errorf("reserved %d: share %d reads back as %d (exact %v)", reserved, share, got, exact)
		}
	}
	for _, reserved := range []uint64{capBytes, capBytes + 1, 2 * capBytes} {
		share := bestEffortShare(capBytes, reserved)
		if got, exact := reservedOf(capBytes, share); share != hierFloorBytes || exact || got != capBytes {
			t.Errorf("reserved %d over the capacity: share %d, reads back %d exact %v", reserved, share, got, exact)
		}
	}
	// A share the old formula wrote (no floor on top) reads one floor
	// more reserved: admission errs on the side of refusing.
	if got, _ := reservedOf(capBytes, capBytes-1_000_000); got != 1_000_000+hierFloorBytes {
		t.Errorf("old-style share: %d", got)
	}
}

// The ledger JoinNode and LeaveNode read instead of the hierarchy says
// what a dump of every class says: the sum of requests, a member's own
// class, free minors; at the capacity (a share at the floor) they count
// the classes instead, and a share a crash left too low errs on the side
// of refusing until it is set again.
func TestHierarchyLedger(t *testing.T) {
	h := newHierNode(t, 4)
	capacity := Capacity{IngressBits: 100_000_000, EgressBits: 100_000_000}
	requests := []uint64{40_000_000, 25_000_000, 0, 35_000_000}
	minors := make([]uint16, len(h.pods))
	for i, p := range h.pods {
		m, err := h.s.JoinNode(capacity, guaranteeOf(requests[i], 100_000_000, PriorityNormal), 0, p.veth, []net.IP{p.ip, p.ip6})
		if err != nil {
			t.Fatalf("join %d: %v", i, err)
		}
		for j := 0; j < i; j++ {
			if minors[j] == m {
				t.Fatalf("pods %d and %d share minor %#x", j, i, m)
			}
		}
		minors[i] = m
		for d, st := range h.states(t) {
			l, err := h.s.readLedger(d)
			if err != nil {
				t.Fatal(err)
			}
			if i < 3 && (!l.ok || l.reservedBytes != st.ReservedBytes || l.capacityBytes != st.CapacityBytes) {
				t.Errorf("after %d joins, %s ledger %+v, classes say reserved %d capacity %d", i+1, d, l, st.ReservedBytes, st.CapacityBytes)
			}
			if i == 3 && (l.ok || st.BestEffortBytes != hierFloorBytes || st.ReservedBytes != 100_000_000/8) {
				t.Errorf("at the capacity, %s ledger %+v, share %d, reserved %d", d, l, st.BestEffortBytes, st.ReservedBytes)
			}
			for j := 0; j <= i; j++ {
				own, ok, err := h.s.ownClass(l.ifb, minors[j])
				want := st.Classes[minors[j]]
				if err != nil || !ok || own.Guaranteed != want.Guaranteed || own.Leaf.RateBytes != want.Leaf.RateBytes ||
					own.Leaf.CeilBytes != want.Leaf.CeilBytes || own.Leaf.Prio != want.Leaf.Prio {
					t.Errorf("%s class of pod %d: read %+v %v %v, dump %+v", d, j, own, ok, err, want)
				}
			}
		}
	}
	// Full: pod 1 leaves through the slow path and the share is exact
	// again.
	if err := h.s.LeaveNode(minors[1], h.pods[1].veth, []net.IP{h.pods[1].ip, h.pods[1].ip6}); err != nil {
		t.Fatal(err)
	}
	for d := range h.states(t) {
		if l, err := h.s.readLedger(d); err != nil || !l.ok || l.reservedBytes != 75_000_000/8 {
			t.Errorf("after leaving a full node, %s ledger %+v %v", d, l, err)
		}
	}
	// A crash after the share shrank, before the class was made: 10 Mbit/s
	// too many reserved. A 25 Mbit/s request that fits is refused until
	// the share is set from the classes again.
	for d := range h.states(t) {
		if err := h.s.SetBestEffort(d, 100_000_000/8, 85_000_000/8); err != nil {
			t.Fatal(err)
		}
	}
	p := h.pods[1]
	if _, err := h.s.JoinNode(capacity, guaranteeOf(25_000_000, 100_000_000, PriorityNormal), 0, p.veth, []net.IP{p.ip}); err == nil {
		t.Fatal("a stale share let a request over it in")
	}
	h.rebalance(t, 100_000_000)
	if _, err := h.s.JoinNode(capacity, guaranteeOf(25_000_000, 100_000_000, PriorityNormal), 0, p.veth, []net.IP{p.ip}); err != nil {
		t.Fatalf("after the share was set again: %v", err)
	}
	if got, ok, err := h.s.getHierClass(0x7FFFFFFF, hierTop); ok || err != nil {
		t.Errorf("a class of a device that does not exist: %+v %v %v", got, ok, err)
	}
}
