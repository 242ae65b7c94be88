package metrics

import (
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

func TestClassMonotonicAcrossMoveAndWrap(t *testing.T) {
	c := &shaping.HierClass{Minor: 0x10, Guaranteed: true, Stats: shaping.HierClassStats{Bytes: 1 << 40, Packets: 1<<32 - 10, Borrows: 7}}
	m := &classMonotonic{guaranteed: true}
	if v := m.update(c); v[gBytes] != 1<<40 || v[gPackets] != 1<<32-10 || v[gBorrows] != 7 {
		t.Fatalf("first = %v", v)
	}
	// The 32-bit packet count wraps while bytes go on.
	c.Stats.Bytes, c.Stats.Packets = 1<<40+3000, 5
	if v := m.update(c); v[gPackets] != 1<<32+5 || v[gBytes] != 1<<40+3000 {
		t.Fatalf("after wrap = %v", v)
	}
	// The request goes: the class is made again under best effort.
	c = &shaping.HierClass{Minor: 0x10, Stats: shaping.HierClassStats{Bytes: 1 << 41, Packets: 2, Borrows: 1}}
	v := m.update(c)
	if v[gBytes] != 1<<40+3000+1<<41 || v[gPackets] != 1<<32+7 || v[gBorrows] != 8 {
		t.Fatalf("after the move = %v", v)
	}
}

// A rejoin that swaps the leaf for a cutting TBF keeps the class and its
// counts; only the drops, now the TBF's from 0, restart.
func TestClassMonotonicAcrossLeafSwap(t *testing.T) {
	c := &shaping.HierClass{Minor: 0x10, Guaranteed: true, Stats: shaping.HierClassStats{Bytes: 5000, Packets: 5, Drops: 40}}
	m := &classMonotonic{guaranteed: true}
	m.update(c)
	c.Cut, c.Stats.Bytes, c.Stats.Packets, c.Stats.Drops = true, 9000, 9, 3
	if v := m.update(c); v[gDrops] != 43 || v[gBytes] != 9000 || v[gPackets] != 9 {
		t.Fatalf("after the swap = %v", v)
	}
	c.Cut, c.Stats.Bytes, c.Stats.Drops = false, 9500, 1
	if v := m.update(c); v[gDrops] != 44 || v[gBytes] != 9500 {
		t.Fatalf("after swapping back = %v", v)
	}
}

func TestJoinGuarantees(t *testing.T) {
	r := rec("a", "web", "c1", "eth0", "", time.Now())
	r.Shaping = &state.Shaping{Guarantee: &state.Guarantee{Minor: 0x12,
		Ingress: &state.GuaranteeDirection{RequestBits: 8e6, CeilBits: 16e6, Priority: "high"},
		Egress:  &state.GuaranteeDirection{CeilBits: 16e6, Priority: "high"}}}
	hier := map[string]shaping.HierState{
		DirIngress: {CapacityBytes: 10e6, ReservedBytes: 12e6, Classes: map[uint16]shaping.HierClass{0x12: {Minor: 0x12, Guaranteed: true}}},
	}
	snap := join([]*state.Record{r}, nil, nil, hier)
	a := snap.Attachments[0]
	if len(a.Dirs) != 0 || len(a.Guarantees) != 2 {
		t.Fatalf("dirs %+v guarantees %+v", a.Dirs, a.Guarantees)
	}
	in, out := a.Guarantees[0], a.Guarantees[1]
	if in.Direction != DirIngress || in.Class == nil || in.Config.RequestBits != 8e6 || in.Minor != 0x12 {
		t.Errorf("ingress %+v", in)
	}
	if out.Direction != DirEgress || out.Class != nil {
		t.Errorf("egress (no hierarchy that way) %+v", out)
	}
	if len(snap.Hierarchy) != 1 || snap.Hierarchy[0].HeadroomBytes() != -2e6 {
		t.Errorf("hierarchy %+v", snap.Hierarchy)
	}
}
