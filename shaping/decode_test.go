package shaping

import (
	"testing"
	"time"

	tc "github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/tcdump"
)

// kernelFqCodel is what a kernel dumps for the fq_codel leaf qoscni sets
// for p: the target goes through codel's 1024 ns units and back, the
// memory limit is capped at 2^31 (fq_codel_change), the packet limit is
// the queue in full frames.
func kernelFqCodel(p *Params, mtu int) (targetUs, limit, memLimit uint32) {
	us := max(p.LimitBytes*1_000_000/p.RateBytes()/2, 1000)
	targetUs = uint32((us * 1000 >> 10 << 10) / 1000)
	frame := uint64(mtu + ethHeader)
	limit = uint32(max((p.LimitBytes+frame-1)/frame, minQueueFrames))
	memLimit = uint32(min(p.LimitBytes, 1<<31))
	return
}

const testIfindex = 7

// decodeDump runs the dumps through tcdump's decoder, as a Shaper reads
// them, and decodeShape.
func decodeDump(t *testing.T, qdiscs, classes []kmsg) (*shape, *qdiscRef) {
	t.Helper()
	_, conn, _ := fakeTc(t, qdiscs, classes)
	q, err := tcdump.Qdiscs(conn)
	if err != nil {
		t.Fatalf("decode of the qdisc dump: %v", err)
	}
	cl, err := tcdump.Classes(conn, testIfindex)
	if err != nil {
		t.Fatalf("decode of the class dump: %v", err)
	}
	return decodeShape(tcdump.Objects(q), cl, testIfindex)
}

// The HTB path (above 34 Gbit/s) with fq_codel under class 1:1, as a
// production kernel has it after qoscni set it up: CHECK and the agent
// must see no difference.
func TestDecodeHTBWithFqCodelLeaf(t *testing.T) {
	p := derive(100_000_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	want := wantShape(p, 1500)
	target, limit, mem := kernelFqCodel(p, 1500)
	leaf := core.BuildHandle(0x10, 0)
	dump := []kmsg{
		kHTBRoot(t, testIfindex),
		kFqCodel(t, testIfindex, leaf, classHandle, target, limit, mem),
	}
	classes := []kmsg{kHTBClass(t, testIfindex, p.RateBytes(), bytesToTicks(p.BurstBytes, p.RateBytes()), leaf)}
	have, foreign := decodeDump(t, dump, classes)
	if foreign != nil || have == nil {
		t.Fatalf("decoded %v, foreign %v", have, foreign)
	}
	if have.kind != "htb" || have.rateBytes != p.RateBytes() {
		t.Errorf("decoded %v", have)
	}
	if !want.matches(have) {
		t.Errorf("HTB with its fq_codel leaf reads back as a difference: have %v, want %v", have, want)
	}
	// A leaf from before the queue bound (fq_codel's defaults) differs.
	dump[1] = kFqCodel(t, testIfindex, leaf, classHandle, target, 10240, 32<<20)
	if have, _ := decodeDump(t, dump, classes); want.matches(have) {
		t.Errorf("an fq_codel leaf with a 32 MiB memory limit matches a %d B queue", p.LimitBytes)
	}
}

func TestDecodeTBFWithFqCodelLeaf(t *testing.T) {
	for _, rate := range []uint64{1_000_000, 10_000_000, 1_000_000_000} {
		p := derive(rate, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
		want := wantShape(p, 1500)
		target, limit, mem := kernelFqCodel(p, 1500)
		q := tc.TbfQopt{
			Rate:   tc.RateSpec{Linklayer: linkEthernet, Rate: uint32(p.RateBytes())},
			Limit:  uint32(p.LimitBytes),
			Buffer: bytesToTicks(p.BurstBytes, p.RateBytes()),
		}
		if want.peakBytes != 0 {
			q.PeakRate = tc.RateSpec{Linklayer: linkEthernet, Rate: uint32(want.peakBytes)}
			q.Mtu = want.peakTicks
		}
		leaf := core.BuildHandle(0x11, 0)
		dump := []kmsg{
			kSimple(testIfindex+1, "noqueue", 0, tc.HandleRoot), // another device
			kTBF(t, testIfindex, rootHandle, q),
			kFqCodel(t, testIfindex, leaf, classHandle, target, limit, mem),
		}
		have, foreign := decodeDump(t, dump, nil)
		if foreign != nil || have == nil {
			t.Fatalf("rate %d: decoded %v, foreign %v", rate, have, foreign)
		}
		if !want.matches(have) {
			t.Errorf("rate %d: TBF with its fq_codel leaf reads back as a difference: have %v, want %v", rate, have, want)
		}
		if have.leaf.kind != "fq_codel" || have.leaf.handle != leaf {
			t.Errorf("rate %d: leaf %v, want fq_codel %x (a reshape changes it under its own handle)", rate, have.leaf, leaf)
		}
		dump[2] = kFqCodel(t, testIfindex, leaf, classHandle, target, 10240, uint32(max(p.LimitBytes*4, 1<<20)))
		if have, _ := decodeDump(t, dump, nil); want.matches(have) {
			t.Errorf("rate %d: a leaf holding up to %d packets matches a %d B queue", rate, 10240, p.LimitBytes)
		}
	}
}

// Kernel defaults carry handle 0 whatever their kind (fq_codel where it is
// net.core.default_qdisc); anything else at the root is someone's.
func TestDecodeRootOwnership(t *testing.T) {
	for _, c := range []struct {
		kind    string
		handle  uint32
		foreign bool
	}{
		{"noqueue", 0, false},
		{"pfifo_fast", 0, false},
		{"fq_codel", 0, false},
		{"mq", 0, false},
		{"htb", core.BuildHandle(5, 0), true},
		{"tbf", core.BuildHandle(7, 0), true},
		{"fq_codel", core.BuildHandle(0x8001, 0), true},
		{"prio", rootHandle, true},
	} {
		have, foreign := decodeDump(t, []kmsg{kSimple(testIfindex, c.kind, c.handle, tc.HandleRoot)}, nil)
		if have != nil || (foreign != nil) != c.foreign {
			t.Errorf("%s %x: shape %v, foreign %v, want foreign=%v", c.kind, c.handle, have, foreign, c.foreign)
		}
		if foreign != nil && foreign.String() != c.kind+" "+handleString(c.handle) {
			t.Errorf("foreign root named %q", foreign)
		}
	}
}

// kernelDump decodes a dump as a Shaper reads it, and returns a Shaper
// whose changes go to the same fake kernel.
func kernelDump(t *testing.T, qdiscs, classes []kmsg) (*Shaper, *shape, *[]tcRequest) {
	t.Helper()
	c, conn, changes := fakeTc(t, qdiscs, classes)
	s := &Shaper{tc: c, rt: conn}
	q, err := s.qdiscs()
	if err != nil {
		t.Fatal(err)
	}
	have, foreign, err := s.readShape(q, testIfindex)
	if err != nil || foreign != nil || have == nil {
		t.Fatalf("read: %v %v %v", have, foreign, err)
	}
	*changes = nil
	return s, have, changes
}

func tbfQopt(p *Params) tc.TbfQopt {
	w := wantShape(p, 1500)
	return tc.TbfQopt{Rate: tc.RateSpec{Linklayer: linkEthernet, Rate: uint32(w.rateBytes)}, PeakRate: tc.RateSpec{Linklayer: linkEthernet, Rate: uint32(w.peakBytes)},
		Limit: uint32(w.limitBytes), Buffer: w.burstTicks, Mtu: w.peakTicks}
}

// requireLeafChange checks that the changes set the fq_codel leaf of want
// under handle, and touched no other leaf handle.
func requireLeafChange(t *testing.T, changes []tcRequest, handle uint32, want *shape) {
	t.Helper()
	var leaves []tcRequest
	for _, c := range changes {
		if c.typ == unix.RTM_NEWQDISC && c.parent == classHandle {
			leaves = append(leaves, c)
		}
	}
	if len(leaves) != 1 || leaves[0].kind != "fq_codel" || leaves[0].handle != handle {
		t.Fatalf("leaf changes %+v, want one fq_codel at %s", leaves, handleString(handle))
	}
	fq := leaves[0].fq
	if deref(fq.MemoryLimit) != want.fq.memLimit || deref(fq.Limit) != want.fq.limit || deref(fq.Target) != want.fq.targetUs {
		t.Errorf("fq_codel options target %d limit %d memory %d, want %+v", deref(fq.Target), deref(fq.Limit), deref(fq.MemoryLimit), want.fq)
	}
	if uint64(want.fq.memLimit) != want.limitBytes {
		t.Errorf("memory limit %d, want the queue bound %d", want.fq.memLimit, want.limitBytes)
	}
}

// On a kernel with fq_codel, a reshape changes the leaf under the handle
// it has (after an earlier graft, 0x11), so the queue is kept; only a
// smaller TBF burst grafts a fresh one on purpose.
func TestFqCodelLeafChangedInPlace(t *testing.T) {
	mk := func(bits uint64) *Params { return derive(bits, 0, false, 10*time.Millisecond, 1500, SourceAnnotation) }
	t.Run("tbf", func(t *testing.T) {
		old, next := mk(10_000_000), mk(20_000_000)
		target, limit, mem := kernelFqCodel(old, 1500)
		s, have, changes := kernelDump(t, []kmsg{
			kTBF(t, testIfindex, rootHandle, tbfQopt(old)),
			kFqCodel(t, testIfindex, leafHandleAlt, classHandle, target, limit, mem),
		}, nil)
		want := wantShape(next, 1500)
		if err := s.setShape(testIfindex, want, have); err != nil {
			t.Fatal(err)
		}
		requireLeafChange(t, *changes, leafHandleAlt, want)
	})
	t.Run("tbf smaller burst", func(t *testing.T) {
		old := mk(1_000_000_000)
		next := derive(1_000_000_000, 80_000, true, 10*time.Millisecond, 1500, SourceAnnotation)
		target, limit, mem := kernelFqCodel(old, 1500)
		s, have, changes := kernelDump(t, []kmsg{
			kTBF(t, testIfindex, rootHandle, tbfQopt(old)),
			kFqCodel(t, testIfindex, leafHandleAlt, classHandle, target, limit, mem),
		}, nil)
		want := wantShape(next, 1500)
		if err := s.setShape(testIfindex, want, have); err != nil {
			t.Fatal(err)
		}
		requireLeafChange(t, *changes, leafHandle, want)
	})
	t.Run("htb", func(t *testing.T) {
		old, next := mk(100_000_000_000), mk(200_000_000_000)
		target, limit, mem := kernelFqCodel(old, 1500)
		s, have, changes := kernelDump(t, []kmsg{
			kHTBRoot(t, testIfindex),
			kFqCodel(t, testIfindex, leafHandle, classHandle, target, limit, mem),
		}, []kmsg{kHTBClass(t, testIfindex, old.RateBytes(), bytesToTicks(old.BurstBytes, old.RateBytes()), leafHandle)})
		want := wantShape(next, 1500)
		if err := s.setShape(testIfindex, want, have); err != nil {
			t.Fatal(err)
		}
		requireLeafChange(t, *changes, leafHandle, want)
	})
}

// The comparison CHECK and the agent run: an HTB or TBF pipeline with the
// fq_codel leaf qoscni sets plans no change.
func TestPlanNoChangeWithFqCodelLeaf(t *testing.T) {
	for _, bits := range []uint64{10_000_000, 100_000_000_000} {
		p := derive(bits, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
		target, limit, mem := kernelFqCodel(p, 1500)
		dump := []kmsg{kFqCodel(t, testIfindex, leafHandle, classHandle, target, limit, mem)}
		var classes []kmsg
		if bits > 34_000_000_000 {
			dump = append(dump, kHTBRoot(t, testIfindex))
			classes = []kmsg{kHTBClass(t, testIfindex, p.RateBytes(), bytesToTicks(p.BurstBytes, p.RateBytes()), leafHandle)}
		} else {
			dump = append(dump, kTBF(t, testIfindex, rootHandle, tbfQopt(p)))
		}
		_, have, _ := kernelDump(t, dump, classes)
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "qvtest0", Index: testIfindex}}
		if acts := plan(Desired{HostVeth: "qvtest0", IFB: "qitest0", MTU: 1500, Plan: Plan{Ingress: p}}, &kstate{veth: veth, ingress: have}); len(acts) != 0 {
			t.Errorf("rate %d: plan over its own fq_codel pipeline: %q", bits, acts.describe())
		}
	}
}
