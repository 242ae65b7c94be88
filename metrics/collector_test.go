package metrics

import (
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/state"
)

func TestMonotonicAcrossResetAndWrap(t *testing.T) {
	m := &monotonic{kind: "tbf", handle: 0x10000}
	s := QdiscStats{Kind: "tbf", Handle: 0x10000, Bytes: 1000, Packets: 10, Drops: 1 << 31}
	if v := m.update(&s); v[cBytes] != 1000 || v[cDrops] != 1<<31 {
		t.Fatalf("first = %v", v)
	}
	// 32-bit drops wrap while bytes go on.
	s.Bytes, s.Packets, s.Drops = 2000, 20, 5
	if v := m.update(&s); v[cBytes] != 2000 || v[cDrops] != 1<<32+5 {
		t.Fatalf("after wrap = %v", v)
	}
	// Qdisc recreated: everything restarts from zero in the kernel.
	s = QdiscStats{Kind: "tbf", Handle: 0x20000, Bytes: 300, Packets: 3, Drops: 0}
	v := m.update(&s)
	if v[cBytes] != 2300 || v[cPackets] != 23 || v[cDrops] != 1<<32+5 {
		t.Fatalf("after reset = %v", v)
	}
	// Same handle, counters lower: also a reset.
	s.Bytes, s.Packets = 100, 1
	if v := m.update(&s); v[cBytes] != 2400 {
		t.Fatalf("after second reset = %v", v)
	}
}

func rec(ns, pod, cid, ifname, dev string, created time.Time) *state.Record {
	return &state.Record{Network: "n", ContainerID: cid, IfName: ifname, Pod: state.Pod{Namespace: ns, Name: pod},
		HostVeth: dev, Created: created,
		Shaping: &state.Shaping{Ingress: &state.Direction{Device: dev, RateBits: 8000}}}
}

func TestJoinHidesDuplicateIdentities(t *testing.T) {
	now := time.Now()
	recs := []*state.Record{
		rec("a", "web", "old", "eth0", "vold", now.Add(-time.Hour)), // stale sandbox, devices gone
		rec("a", "web", "new", "eth0", "vnew", now),
		rec("a", "web", "new", "net1", "vnet1", now), // second interface: its own series
		rec("", "", "0123456789abcdef", "eth0", "vraw", now),
	}
	qd := map[string]QdiscStats{"vnew": {Kind: "tbf"}, "vnet1": {Kind: "tbf"}}
	snap := join(recs, nil, qd, nil)
	if len(snap.Attachments) != 3 || len(snap.Hidden) != 1 || snap.Hidden[0].ContainerID != "old" {
		t.Fatalf("attachments %d hidden %v", len(snap.Attachments), snap.Hidden)
	}
	for _, a := range snap.Attachments {
		if a.Namespace == "a" && a.Interface == "eth0" && a.Record.ContainerID != "new" {
			t.Errorf("exported %s, want the live record", a.Record.ContainerID)
		}
		if a.Namespace == "" && a.Pod != "0123456789ab" {
			t.Errorf("pod label for a record without pod identity = %q", a.Pod)
		}
	}
	// Neither has live devices: the newest wins.
	snap = join(recs[:2], nil, nil, nil)
	if snap.Attachments[0].Record.ContainerID != "new" {
		t.Errorf("exported %s, want the newest", snap.Attachments[0].Record.ContainerID)
	}
}
