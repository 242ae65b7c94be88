package shaping

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"

	tc "github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/tcdump"
)

// The node hierarchy: with a node capacity, every pod's traffic in one
// direction goes through one HTB on a node-wide IFB, where each pod has a
// class whose rate is its guaranteed request and whose ceil is its limit
// (or the capacity). HTB lends what a class does not use to the others, so
// the node's capacity is shared work-conservingly: a pod always gets its
// request, and idle capacity goes to whoever wants it, higher priority
// first.
//
//	qoscni.in  (traffic into pods)      qoscni.out (traffic out of pods)
//	1:   htb, unclassified -> 1:3
//	1:1  rate = ceil = capacity
//	 |- 1:<m>  a pod with a request: rate = request, ceil = limit or capacity
//	 '- 1:2    best effort: rate = capacity - sum of requests + floor
//	           (the sum reads back from it: hierget.go), ceil = capacity
//	     |- 1:<m>  a pod without a request: rate = floor, ceil = limit or capacity
//	     '- 1:3    unclassified (ARP, neighbour discovery, forged sources)
//
// Each leaf has a byte FIFO under it (handle <m>:) sized by the pod's
// queue-delay budget. A pod's host veth hands its packets to the IFBs
// with the same marked redirect the per-pod pipeline uses: from the egress
// hook (into the pod) to qoscni.in, from the ingress hook (out of the pod)
// to qoscni.out. The IFB sends each packet back where it came from.
//
// Classification is O(1) in the number of pods: on each IFB one u32
// classifier per address family hashes the last byte of the pod's address
// (the destination into pods, the source out of them) into a 256-bucket
// table whose entries match the whole address and name the pod's class.
// A bucket holds one entry per pod whose address ends in that byte: one
// for a /24 of pods, 16 for a /20. Why u32: this kernel has no flower or
// matchall; cls_bpf would need eBPF maps for a table (classic BPF has
// none); nftables can set skb->priority, which HTB reads as a class, but
// only in netfilter hooks the bridged and the routed paths reach at
// different points, and only when br_netfilter is on. u32 sees every
// packet on the IFB, whatever path brought it.
const (
	// HierarchyIngressIFB and HierarchyEgressIFB are the node-wide IFBs.
	HierarchyIngressIFB = "qoscni.in"
	HierarchyEgressIFB  = "qoscni.out"
	// MinMinor and MaxMinor bound pod class minors: a u32 key node id is
	// 12 bits, and the entry's node id is the class minor.
	MinMinor uint16 = 0x10
	MaxMinor uint16 = 0xFFF
	// hierFloorBytes is the rate of a class that is guaranteed nothing
	// (HTB needs one): best-effort leaves, and the best-effort class when
	// requests take the whole capacity. 1 kbit/s.
	hierFloorBytes = 125
	// hierQuantum is every leaf's DRR quantum: a whole GSO packet, so
	// borrowers share spare capacity by bytes, equally within a priority
	// (and no class hits HTB's own quantum clamp of rate/r2q).
	hierQuantum = 65536 + ethHeader
	// hierLeafFloor is the smallest FIFO of a leaf that does not cut (its
	// queue is at least peakQueueBelow): one 64 KiB GSO packet with the
	// headers the kernel counts for each of its segments (68.4 kB at a
	// 1500 MTU), which HTB and the IFB pass whole.
	hierLeafFloor = 72 << 10
	// hierMaxPacket is the largest packet an IFB passes: a 64 KiB GSO
	// packet. Each HTB class's bucket holds two.
	hierMaxPacket = 65535 + ethHeader
	// hierIFBMTU is the IFBs' MTU. Nothing on a redirect's path checks
	// it (pods of any MTU, GSO packets of 64 KiB go through), but TBF
	// warns in the kernel log when its bucket is below the device's
	// frame, and a cutting leaf's bucket is a few frames.
	hierIFBMTU = 1500
	// hierCutRate is a cutting leaf's TBF rate, 2^40 bytes/s (8.8
	// Tbit/s): it never holds a packet back. At 2^32 - 1 bytes/s, the
	// most TBF takes without TCA_TBF_RATE64, HTB's back-to-back dequeues
	// empty its few-frame bucket and the kernel logs the leaf as
	// non-work-conserving.
	hierCutRate = 1 << 40
	// hierCutMajor is added to a pod's minor for the handle of its
	// cutting TBF: a FIFO leaf is <m>:, a cutting one <0x1000+m>:, so
	// one replaces the other in one graft whichever was there.
	hierCutMajor = 0x1000
	// u32 tables: one per family, 256 buckets on the address's last byte.
	hierHT4, hierHT6   = 0x100, 0x101
	hierPrio4          = 1
	hierPrio6          = 2
	hierDivisor        = 256
	ethPIP, ethPIPv6   = 0x0800, 0x86DD
	unclassifiedQueue  = 256 << 10
	hierUnclassifiedTC = 3
)

var (
	hierTop       = core.BuildHandle(1, 1)
	hierBestEff   = core.BuildHandle(1, 2)
	hierUnclassed = core.BuildHandle(1, hierUnclassifiedTC)
)

// HierDirection says which way a hierarchy shapes.
type HierDirection int

const (
	// IntoPods is traffic to the pods (kubernetes.io/ingress-bandwidth).
	IntoPods HierDirection = iota
	// OutOfPods is traffic from the pods (kubernetes.io/egress-bandwidth).
	OutOfPods
)

func (d HierDirection) String() string {
	if d == IntoPods {
		return "ingress"
	}
	return "egress"
}

// IFB is the direction's node-wide device.
func (d HierDirection) IFB() string {
	if d == IntoPods {
		return HierarchyIngressIFB
	}
	return HierarchyEgressIFB
}

// vethHook is where the host veth hands the direction's packets over.
func (d HierDirection) vethHook() uint32 {
	if d == IntoPods {
		return egressHook
	}
	return ingressHook
}

// addrOffsets are where the classified address sits in the IPv4 and IPv6
// headers: the destination into pods, the source out of them.
func (d HierDirection) addrOffsets() (v4, v6 uint32) {
	if d == IntoPods {
		return 16, 24
	}
	return 12, 8
}

// HierLeaf is one pod's class in one direction, in the kernel's units.
type HierLeaf struct {
	// RateBytes is the guarantee; 0 puts the pod under best effort.
	RateBytes uint64
	CeilBytes uint64
	// Prio: lower borrows first (HTB's class priority, 0 to 7).
	Prio        uint8
	BurstBytes  uint64
	CburstBytes uint64
	QueueBytes  uint64
}

// HierMember is one pod in the node hierarchy.
type HierMember struct {
	Minor    uint16
	HostVeth string
	// IPs are the addresses its classes are found by.
	IPs []net.IP
	// Ingress and Egress are nil where that direction has no hierarchy.
	Ingress, Egress *HierLeaf
}

func (m HierMember) leaf(d HierDirection) *HierLeaf {
	if d == IntoPods {
		return m.Ingress
	}
	return m.Egress
}

// HierCapacity is the node's capacity per direction in bytes/s (0: no
// hierarchy that way).
type HierCapacity struct{ IngressBytes, EgressBytes uint64 }

func (c HierCapacity) of(d HierDirection) uint64 {
	if d == IntoPods {
		return c.IngressBytes
	}
	return c.EgressBytes
}

// HierClass is a pod class as the kernel has it.
type HierClass struct {
	Minor uint16
	Leaf  HierLeaf
	// Guaranteed: the class hangs off 1:1 (it has a request), not off
	// the best-effort class.
	Guaranteed bool
	// Cut: its leaf is a cutting TBF (hierLeafQueue), and Stats.Drops
	// counts that TBF's dropped frames rather than HTB's whole packets.
	Cut bool
	// Stats are the class's counters since the kernel made it.
	Stats HierClassStats
}

// HierClassStats are an HTB class's counters, from the class dump
// ReadHierarchy takes anyway (TCA_STATS2 and TCA_XSTATS, read by tcdump).
// The byte count is 64 bits; the others are 32 and wrap.
type HierClassStats struct {
	Bytes      uint64
	Packets    uint32
	Drops      uint32 // its queue was full
	Overlimits uint32 // times the class went over its ceil
	// Lends and Borrows are HTB's counts of dequeues, not bytes (a GSO
	// packet counts once, where Packets counts its segments). On a leaf,
	// Lends counts the packets it sent on its own rate (its guarantee)
	// and Borrows those it sent on rate borrowed from its parent, above
	// its guarantee.
	Lends   uint32
	Borrows uint32
	Backlog uint32 // bytes in its queue now
	Qlen    uint32 // packets in its queue now
}

func hierClassStats(c *tc.Object) HierClassStats {
	var s HierClassStats
	if st := c.Stats; st != nil {
		s.Bytes, s.Packets, s.Drops, s.Overlimits = st.Bytes, st.Packets, st.Drops, st.Overlimits
		s.Backlog, s.Qlen = st.Backlog, st.Qlen
	}
	if c.XStats != nil && c.XStats.Htb != nil {
		s.Lends, s.Borrows = c.XStats.Htb.Lends, c.XStats.Htb.Borrows
	}
	return s
}

// HierState is one direction's hierarchy as the kernel has it.
type HierState struct {
	// CapacityBytes is 1:1's rate; 0 when there is no hierarchy.
	CapacityBytes uint64
	// ReservedBytes sums the rates of the guaranteed classes.
	ReservedBytes uint64
	Classes       map[uint16]HierClass
	// Entries are the addresses classified into each minor (only from
	// ReadHierarchyFull).
	Entries map[uint16][]net.IP
	// BestEffortBytes is the best-effort class's rate.
	BestEffortBytes uint64
	// Tables counts the families whose hash table is there and linked
	// (2 when whole; only from ReadHierarchyFull).
	Tables int
	// leaves are the pod classes' queues (only from ReadHierarchyFull).
	leaves map[uint16]leafRead
}

// leafRead is the queue under a pod class as the kernel has it: a FIFO at
// <m>: or a cutting TBF at <0x1000+m>:, or another kind. The kernel does
// not dump a TBF's cut size (at hierCutRate the bucket is under one 64 ns
// tick), so the kind and the queue limit are what is compared.
type leafRead struct {
	kind  string
	limit uint64
}

func (l leafRead) describe(found bool) string {
	if !found {
		return "missing"
	}
	if l.limit == 0 {
		return l.kind
	}
	return fmt.Sprintf("%s of %d bytes", l.kind, l.limit)
}

// read is how the kernel shows q.
func (q leafQueue) read() leafRead {
	if q.cut == 0 {
		return leafRead{kind: "bfifo", limit: min(max(q.limit, hierLeafFloor), math.MaxUint32)}
	}
	return leafRead{kind: "tbf", limit: min(q.limit, math.MaxUint32)}
}

func htbRate(r tc.RateSpec, r64 *uint64) uint64 {
	if r64 != nil && *r64 != 0 {
		return *r64
	}
	return uint64(r.Rate)
}

// ReadHierarchy returns the direction's hierarchy with its classes'
// counters, from one class dump (a zero state when its IFB or root is
// missing).
func (s *Shaper) ReadHierarchy(d HierDirection) (HierState, error) {
	return s.readHierarchy(d, &qdiscDump{s: s})
}

// readClasses is ReadHierarchy for a reader of rates and parents only
// (admission's slow path, the best-effort share): a cutting leaf's drops
// would cost a dump of every qdisc of the node, so they stay HTB's.
func (s *Shaper) readClasses(d HierDirection) (HierState, error) {
	return s.readHierarchy(d, nil)
}

// qdiscDump is the namespace's qdiscs, dumped once when first needed: a
// read of both directions' hierarchies takes at most one.
type qdiscDump struct {
	s    *Shaper
	q    []tc.Object
	done bool
}

func (c *qdiscDump) get() ([]tc.Object, error) {
	if !c.done {
		q, err := c.s.qdiscs()
		if err != nil {
			return nil, err
		}
		c.q, c.done = q, true
	}
	return c.q, nil
}

// readHierarchy reads the direction's classes; qd, when not nil, gives the
// cutting leaves' drops (addCutDrops).
func (s *Shaper) readHierarchy(d HierDirection, qd *qdiscDump) (HierState, error) {
	st := HierState{Classes: map[uint16]HierClass{}}
	ifb, err := s.linkOrNil(d.IFB())
	if err != nil || ifb == nil {
		return st, err
	}
	classes, err := tcdump.Classes(s.rt, uint32(ifb.Attrs().Index))
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return st, nil
		}
		return st, fmt.Errorf("%s: %w", d.IFB(), err)
	}
	for _, c := range classes {
		if c.Kind != "htb" || c.Htb == nil || c.Htb.Parms == nil {
			continue
		}
		p := c.Htb.Parms
		rate, ceil := htbRate(p.Rate, c.Htb.Rate64), htbRate(p.Ceil, c.Htb.Ceil64)
		if c.Handle == hierTop {
			st.CapacityBytes = rate
			continue
		}
		if c.Handle == hierBestEff {
			st.BestEffortBytes = rate
			continue
		}
		minor := uint16(c.Handle & 0xFFFF)
		if c.Handle>>16 != 1 || minor < MinMinor || minor > MaxMinor {
			continue
		}
		hc := HierClass{Minor: minor, Guaranteed: c.Parent == hierTop, Leaf: HierLeaf{
			CeilBytes: ceil, Prio: uint8(p.Prio),
			BurstBytes: ticksToBytes(p.Buffer, rate), CburstBytes: ticksToBytes(p.Cbuffer, ceil),
		}, Stats: hierClassStats(&c)}
		if hc.Guaranteed {
			hc.Leaf.RateBytes = rate
			st.ReservedBytes += rate
		}
		st.Classes[minor] = hc
	}
	if qd == nil {
		return st, nil
	}
	return st, addCutDrops(ifb.Attrs().Index, classes, qd, &st)
}

// addCutDrops counts a cutting leaf's drops as its class's. A TBF that
// cut a GSO packet reports success to HTB when one of its frames got into
// the queue, so HTB counts only packets dropped whole; the TBF counts
// every dropped frame (of a cut packet, or whole), HTB's among them. Its
// class in the class dump (kind tbf, <0x1000+m>:1) says which leaves cut;
// only then does this take a qdisc dump.
func addCutDrops(idx int, classes []tc.Object, qd *qdiscDump, st *HierState) error {
	cut := map[uint32]uint16{}
	for _, c := range classes {
		major := c.Handle >> 16
		if c.Kind == "tbf" && major >= hierCutMajor+uint32(MinMinor) && major <= hierCutMajor+uint32(MaxMinor) {
			cut[major<<16] = uint16(major - hierCutMajor)
		}
	}
	if len(cut) == 0 {
		return nil
	}
	qdiscs, err := qd.get()
	if err != nil {
		return err
	}
	for _, q := range qdiscs {
		minor, ok := cut[q.Handle]
		if !ok || q.Ifindex != uint32(idx) || q.Kind != "tbf" || q.Stats == nil {
			continue
		}
		if hc, ok := st.Classes[minor]; ok {
			hc.Cut, hc.Stats.Drops = true, q.Stats.Drops
			st.Classes[minor] = hc
		}
	}
	return nil
}

// EnsureHierarchy creates what is missing of the direction's hierarchy
// (IFB, HTB root, the capacity, best-effort and unclassified classes, the
// u32 tables) and sets the capacity and the best-effort share from
// reservedBytes. Idempotent.
func (s *Shaper) EnsureHierarchy(d HierDirection, capacityBytes, reservedBytes uint64) error {
	ifb, err := s.linkOrNil(d.IFB())
	if err != nil {
		return err
	}
	if ifb == nil {
		if ifb, err = s.createIFB(d.IFB(), hierIFBMTU); err != nil {
			return err
		}
	} else if ifb.Attrs().MTU != hierIFBMTU {
		// Made by an earlier version (65535).
		if err := s.nl.LinkSetMTU(ifb, hierIFBMTU); err != nil {
			return fmt.Errorf("set the MTU of %s: %w", d.IFB(), err)
		}
	}
	idx := ifb.Attrs().Index
	qdiscs, err := s.qdiscs()
	if err != nil {
		return err
	}
	if r := rootQdisc(qdiscs, uint32(idx)); r == nil || r.Kind != "htb" || r.Handle != rootHandle {
		root := &tc.Object{Msg: msg(idx, rootHandle, tc.HandleRoot, 0), Attribute: tc.Attribute{Kind: "htb", Htb: &tc.Htb{
			Init: &tc.HtbGlob{Version: 3, Rate2Quantum: 10, Defcls: hierUnclassifiedTC},
		}}}
		if err := s.tc.Qdisc().Replace(root); err != nil {
			return fmt.Errorf("add htb to %s: %w", d.IFB(), err)
		}
	}
	if err := s.setHierClass(idx, hierTop, rootHandle, capacityBytes, capacityBytes, 0, capacityBytes/100, capacityBytes/100); err != nil {
		return err
	}
	if err := s.setBestEffort(d, idx, capacityBytes, reservedBytes); err != nil {
		return err
	}
	if err := s.setHierClass(idx, hierUnclassed, hierBestEff, hierFloorBytes, capacityBytes, 7, 0, capacityBytes/100); err != nil {
		return err
	}
	if err := s.setHierLeafQueue(idx, hierUnclassifiedTC, unclassifiedQueue); err != nil {
		return err
	}
	return s.ensureHashTables(d, idx)
}

// setBestEffort gives the best-effort class what requests leave.
func (s *Shaper) setBestEffort(d HierDirection, idx int, capacityBytes, reservedBytes uint64) error {
	share := bestEffortShare(capacityBytes, reservedBytes)
	return s.setHierClass(idx, hierBestEff, hierTop, share, capacityBytes, 0, share/100, capacityBytes/100)
}

// SetBestEffort updates the direction's best-effort share after a change
// of the sum of requests.
func (s *Shaper) SetBestEffort(d HierDirection, capacityBytes, reservedBytes uint64) error {
	ifb, err := s.linkOrNil(d.IFB())
	if err != nil || ifb == nil {
		return err
	}
	return s.setBestEffort(d, ifb.Attrs().Index, capacityBytes, reservedBytes)
}

func (s *Shaper) setHierClass(idx int, handle, parent uint32, rate, ceil uint64, prio uint8, burst, cburst uint64) error {
	rate, ceil = max(rate, 1), max(ceil, rate, 1)
	// HTB refuses a bucket that cannot hold one full frame.
	burst = max(burst, 2*hierMaxPacket)
	cburst = max(cburst, 2*hierMaxPacket)
	r32, c32 := uint32(min(rate, math.MaxUint32)), uint32(min(ceil, math.MaxUint32))
	class := &tc.Object{Msg: msg(idx, handle, parent, 0), Attribute: tc.Attribute{Kind: "htb", Htb: &tc.Htb{
		Parms: &tc.HtbOpt{
			Rate:    tc.RateSpec{Rate: r32, Linklayer: linkEthernet},
			Ceil:    tc.RateSpec{Rate: c32, Linklayer: linkEthernet},
			Buffer:  bytesToTicks(burst, rate),
			Cbuffer: bytesToTicks(cburst, ceil),
			Quantum: hierQuantum,
			Prio:    uint32(prio),
		},
		Rate64: &rate,
		Ceil64: &ceil,
	}}}
	if err := s.tc.Class().Replace(class); err != nil {
		return fmt.Errorf("set htb class %s on ifindex %d: %w", handleString(handle), idx, err)
	}
	return nil
}

func (s *Shaper) setHierLeafQueue(idx int, minor uint16, limit uint64) error {
	// The FIFO sees whole GSO packets (neither the IFB nor HTB cuts
	// them): a bound below one would drop every one.
	limit = max(limit, hierLeafFloor)
	leaf := &tc.Object{Msg: msg(idx, core.BuildHandle(uint32(minor), 0), core.BuildHandle(1, uint32(minor)), 0),
		Attribute: tc.Attribute{Kind: "bfifo", Bfifo: &tc.FifoOpt{Limit: uint32(min(limit, math.MaxUint32))}}}
	if err := s.tc.Qdisc().Replace(leaf); err != nil {
		return fmt.Errorf("set the queue of class 1:%x on ifindex %d: %w", minor, idx, err)
	}
	return nil
}

// leafQueue is what goes under a pod's class: a byte FIFO of limit bytes,
// or, when cut is not 0, a TBF that cuts every packet above cut bytes
// into frames before its FIFO of limit bytes.
type leafQueue struct{ limit, cut uint64 }

// hierLeafQueue sizes a pod's leaf from its queue-delay budget (queue,
// bytes) and its device's MTU.
//
// HTB sends a GSO packet whole and charges its class for it afterwards.
// Where the budget holds two GSO packets or more (a queue of at least
// peakQueueBelow, the same line the per-pod TBF draws for its peak rate),
// that granularity is within the budget and the FIFO takes the packets
// whole. Below it a 64 KiB packet is most of the budget (9.2 ms at 57
// Mbit/s), so a TBF under the class cuts each packet larger than a
// quarter of the budget into frames first (tbf_segment), at least two
// frames, and the queue is the budget itself. The TBF never limits the
// rate (hierCutRate); HTB does.
func hierLeafQueue(queue uint64, mtu int) leafQueue {
	if queue >= peakQueueBelow {
		return leafQueue{limit: max(queue, hierLeafFloor)}
	}
	frame := uint64(max(mtu, 68) + ethHeader)
	cut := max(queue/4, 2*frame, hierIFBMTU+ethHeader)
	return leafQueue{limit: max(queue, 2*cut), cut: cut}
}

// cutHandle is the handle of minor's cutting TBF.
func cutHandle(minor uint16) uint32 { return core.BuildHandle(hierCutMajor+uint32(minor), 0) }

// setPodLeaf puts q under pod class 1:<minor>, replacing whichever
// leaf was there in one graft.
func (s *Shaper) setPodLeaf(idx int, minor uint16, q leafQueue) error {
	if q.cut == 0 {
		return s.setHierLeafQueue(idx, minor, q.limit)
	}
	if err := s.setCutTBF(idx, cutHandle(minor), core.BuildHandle(1, uint32(minor)), q.cut, q.limit); err != nil {
		return fmt.Errorf("set the queue of class 1:%x on ifindex %d: %w", minor, idx, err)
	}
	return nil
}

// u32 handles: table (12 bits), bucket (8), node (12).
func u32Handle(ht uint32, bucket uint8, node uint16) uint32 {
	return ht<<20 | uint32(bucket)<<12 | uint32(node)
}

// hashSel is the selector of the filter that links a family's root table
// to its hash table, hashing the byte at hoff of the network header.
//
// go-tc v0.4.4 packs tc_u32_sel without the pad byte the kernel's layout
// has after nkeys, so every field from offmask on lands one byte early;
// the values here are chosen so that the bytes the kernel reads are
// offmask 0, off 0, offoff 0, hoff = hoff and hmask 0xff000000 (the first
// byte of the 32-bit word at hoff). TestHierarchyHashKey reads the filter
// back with tc(8) and fails if go-tc's packing ever changes.
func hashSel(hoff uint16) *tc.U32Sel {
	return &tc.U32Sel{
		Flags: u32Terminal,
		NKeys: 1,
		Hoff:  hoff << 8,
		Hmask: 0x00FF0000,
		Keys:  []tc.U32Key{{Mask: 0, Val: 0, Off: 0}},
	}
}

func (s *Shaper) ensureHashTables(d HierDirection, idx int) error {
	filters, err := s.tc.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(idx), Parent: rootHandle})
	if err != nil {
		return fmt.Errorf("dump filters of %s: %w", d.IFB(), err)
	}
	have := map[uint32]bool{}
	linked := map[uint16]bool{}
	for _, f := range filters {
		if f.Kind != "u32" {
			continue
		}
		have[f.Handle] = true
		if f.U32 != nil && f.U32.Link != nil {
			linked[filterPrio(&f)] = true
		}
	}
	off4, off6 := d.addrOffsets()
	for _, t := range []struct {
		ht    uint32
		prio  uint16
		proto uint16
		hoff  uint16
	}{
		{hierHT4, hierPrio4, ethPIP, uint16(off4 + 3)},
		{hierHT6, hierPrio6, ethPIPv6, uint16(off6 + 15)},
	} {
		info := uint32(t.prio)<<16 | uint32(htons(t.proto))
		if !have[u32Handle(t.ht, 0, 0)] {
			div := uint32(hierDivisor)
			f := &tc.Object{Msg: msg(idx, u32Handle(t.ht, 0, 0), rootHandle, info), Attribute: tc.Attribute{Kind: "u32", U32: &tc.U32{Divisor: &div}}}
			if err := s.tc.Filter().Add(f); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("add u32 hash table %x: on %s: %w", t.ht, d.IFB(), err)
			}
		}
		if !linked[t.prio] {
			link := u32Handle(t.ht, 0, 0)
			f := &tc.Object{Msg: msg(idx, 0, rootHandle, info), Attribute: tc.Attribute{Kind: "u32", U32: &tc.U32{
				Link: &link, Sel: hashSel(t.hoff),
			}}}
			if err := s.tc.Filter().Add(f); err != nil {
				return fmt.Errorf("link u32 hash table %x: on %s: %w", t.ht, d.IFB(), err)
			}
		}
	}
	return nil
}

// addrEntry is the u32 key node that sends one address to a class.
func addrEntry(d HierDirection, idx int, ip net.IP, minor uint16) *tc.Object {
	off4, off6 := d.addrOffsets()
	ht, prio, proto, off := uint32(hierHT4), uint16(hierPrio4), uint16(ethPIP), off4
	b := ip.To4()
	if b == nil {
		b = ip.To16()
		ht, prio, proto, off = hierHT6, hierPrio6, ethPIPv6, off6
	}
	keys := make([]tc.U32Key, 0, len(b)/4)
	for i := 0; i < len(b); i += 4 {
		// Val and Mask are compared with the packet's bytes as they lie;
		// go-tc writes them in host order, so give it the bytes as a
		// host-order word.
		keys = append(keys, tc.U32Key{Mask: math.MaxUint32, Val: binary.NativeEndian.Uint32(b[i : i+4]), Off: off + uint32(i)})
	}
	bucket := b[len(b)-1]
	hash := u32Handle(ht, bucket, 0)
	classID := core.BuildHandle(1, uint32(minor))
	return &tc.Object{Msg: msg(idx, u32Handle(ht, bucket, minor), rootHandle, uint32(prio)<<16|uint32(htons(proto))),
		Attribute: tc.Attribute{Kind: "u32", U32: &tc.U32{
			ClassID: &classID,
			Hash:    &hash,
			Sel:     &tc.U32Sel{Flags: u32Terminal, NKeys: uint8(len(keys)), Keys: keys},
		}}}
}

// Join puts the member into every direction it has a leaf for: its
// class (created, or changed in place), the queue under it, its address
// entries and the redirect on its host veth, in that order, so a packet
// is never sent to a class that does not exist yet. A class whose
// guarantee appears or goes is moved between 1:1 and best effort (HTB
// cannot move a class: its entries go to the unclassified class, the
// class is made again, the entries come back). The caller holds the
// node's hierarchy lock and has admitted the request; the best-effort
// share is the caller's to update (SetBestEffort).
func (s *Shaper) Join(m HierMember, cur map[HierDirection]HierState) error {
	return s.join(m, cur, nil)
}

// join is Join with the IFBs' ifindexes where the caller has them (ifbs;
// nil or 0: looked up), so a join makes no netlink request twice.
func (s *Shaper) join(m HierMember, cur map[HierDirection]HierState, ifbs map[HierDirection]int) error {
	veth, err := s.linkOrNil(m.HostVeth)
	if err != nil {
		return err
	}
	if veth == nil {
		return fmt.Errorf("join %s to the node hierarchy: no such interface", m.HostVeth)
	}
	vethIdx := veth.Attrs().Index
	if err := s.addClsact(vethIdx); err != nil {
		return err
	}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		leaf := m.leaf(d)
		if leaf == nil {
			continue
		}
		idx := ifbs[d]
		if idx == 0 {
			ifb, err := s.linkOrNil(d.IFB())
			if err != nil {
				return err
			}
			if ifb == nil {
				return fmt.Errorf("join %s to the %s hierarchy: %s does not exist", m.HostVeth, d, d.IFB())
			}
			idx = ifb.Attrs().Index
		}
		if err := s.joinDirection(d, m, *leaf, cur[d], vethIdx, veth.Attrs().MTU, idx); err != nil {
			return fmt.Errorf("join %s to the %s hierarchy: %w", m.HostVeth, d, err)
		}
	}
	return nil
}

func (s *Shaper) joinDirection(d HierDirection, m HierMember, leaf HierLeaf, cur HierState, vethIdx, mtu, idx int) error {
	handle := core.BuildHandle(1, uint32(m.Minor))
	parent := hierBestEff
	if leaf.RateBytes > 0 {
		parent = hierTop
	}
	rate := max(leaf.RateBytes, hierFloorBytes)
	if have, ok := cur.Classes[m.Minor]; ok && have.Guaranteed != (leaf.RateBytes > 0) {
		if err := s.moveClass(d, idx, m); err != nil {
			return err
		}
	}
	if err := s.setHierClass(idx, handle, parent, rate, leaf.CeilBytes, leaf.Prio, leaf.BurstBytes, leaf.CburstBytes); err != nil {
		return err
	}
	if err := s.setPodLeaf(idx, m.Minor, hierLeafQueue(leaf.QueueBytes, mtu)); err != nil {
		return err
	}
	for _, ip := range m.IPs {
		if err := s.tc.Filter().Replace(addrEntry(d, idx, ip, m.Minor)); err != nil {
			return fmt.Errorf("classify %s into 1:%x on %s: %w", ip, m.Minor, d.IFB(), err)
		}
	}
	rs, err := s.readRedirectOn(d.vethHook(), vethIdx, idx)
	if err != nil {
		return err
	}
	switch {
	case rs.conflict != "":
		return fmt.Errorf("priority %d of host veth %s holds %s that qoscni did not create", hookPrio(d.vethHook()), m.HostVeth, rs.conflict)
	case rs.handle == 0:
		if err := s.tc.Filter().Add(redirectFilterOn(d.vethHook(), vethIdx, idx, redirectNode)); err != nil {
			return fmt.Errorf("redirect %s to %s: %w", m.HostVeth, d.IFB(), err)
		}
	case rs.target != uint32(idx):
		if err := s.tc.Filter().Replace(redirectFilterOn(d.vethHook(), vethIdx, idx, rs.handle)); err != nil {
			return fmt.Errorf("redirect %s to %s: %w", m.HostVeth, d.IFB(), err)
		}
	}
	return nil
}

// moveClass removes a class whose parent must change: its address
// entries point at the unclassified class meanwhile.
func (s *Shaper) moveClass(d HierDirection, idx int, m HierMember) error {
	for _, ip := range m.IPs {
		e := addrEntry(d, idx, ip, m.Minor)
		unclassed := hierUnclassed
		e.U32.ClassID = &unclassed
		if err := s.tc.Filter().Replace(e); err != nil {
			return fmt.Errorf("park %s in the unclassified class: %w", ip, err)
		}
	}
	if err := s.deleteEntriesOf(d, idx, m.Minor, true); err != nil {
		return err
	}
	return s.deleteHierClass(idx, m.Minor)
}

// deleteEntriesOf removes the u32 entries of a minor (found by their
// node id in every bucket: a dump, so DEL needs no addresses).
// keepParked leaves the entries that point at the unclassified class.
func (s *Shaper) deleteEntriesOf(d HierDirection, idx int, minor uint16, keepParked bool) error {
	filters, err := s.tc.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(idx), Parent: rootHandle})
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("dump filters of %s: %w", d.IFB(), err)
	}
	for _, f := range filters {
		if f.Kind != "u32" || f.Handle&0xFFF != uint32(minor) || isU32Structure(&f) {
			continue
		}
		ht := f.Handle >> 20
		if ht != hierHT4 && ht != hierHT6 {
			continue
		}
		if keepParked && f.U32 != nil && f.U32.ClassID != nil && *f.U32.ClassID == hierUnclassed {
			continue
		}
		del := &tc.Object{Msg: msg(idx, f.Handle, rootHandle, f.Info), Attribute: tc.Attribute{Kind: "u32"}}
		if err := s.tc.Filter().Delete(del); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete u32 entry %x on %s: %w", f.Handle, d.IFB(), err)
		}
	}
	return nil
}

// deleteEntries removes a minor's entries of the given addresses, each
// by the handle addrEntry gives it (bucket and node id): no dump.
func (s *Shaper) deleteEntries(d HierDirection, idx int, minor uint16, ips []net.IP) error {
	for _, ip := range ips {
		e := addrEntry(d, idx, ip, minor)
		del := &tc.Object{Msg: e.Msg, Attribute: tc.Attribute{Kind: "u32"}}
		if err := s.tc.Filter().Delete(del); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("delete the u32 entry of %s on %s: %w", ip, d.IFB(), err)
		}
	}
	return nil
}

func (s *Shaper) deleteHierClass(idx int, minor uint16) error {
	leaf := &tc.Object{Msg: msg(idx, core.BuildHandle(uint32(minor), 0), core.BuildHandle(1, uint32(minor)), 0),
		Attribute: tc.Attribute{Kind: "bfifo", Bfifo: &tc.FifoOpt{}}}
	if err := s.tc.Qdisc().Delete(leaf); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("delete the queue of class 1:%x: %w", minor, err)
	}
	class := &tc.Object{Msg: msg(idx, core.BuildHandle(1, uint32(minor)), 0, 0), Attribute: tc.Attribute{Kind: "htb", Htb: &tc.Htb{Parms: &tc.HtbOpt{}}}}
	if err := s.tc.Class().Delete(class); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete class 1:%x: %w", minor, err)
	}
	return nil
}

// Leave takes a member out of both directions: the redirects off its host
// veth first (when the veth is still there: chained mode), so no packet
// is sent to the IFB for a class that is going, then its entries, queue
// and class. ips are the addresses the member joined with: its entries
// are deleted by handle; without them (a class nobody claims) they are
// found in a dump of the IFB's filters. Idempotent; the best-effort share
// is the caller's to update.
func (s *Shaper) Leave(minor uint16, hostVeth string, ips []net.IP) error {
	var errs []error
	veth, err := s.linkOrNil(hostVeth)
	if err != nil {
		errs = append(errs, err)
	}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		ifb, err := s.linkOrNil(d.IFB())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if veth != nil {
			errs = append(errs, s.removeHierRedirect(d, veth.Attrs().Index, linkIndex(ifb)))
		}
		if ifb == nil {
			continue
		}
		idx := ifb.Attrs().Index
		if len(ips) > 0 {
			errs = append(errs, s.deleteEntries(d, idx, minor, ips))
		} else {
			errs = append(errs, s.deleteEntriesOf(d, idx, minor, false))
		}
		errs = append(errs, s.deleteHierClass(idx, minor))
	}
	return errors.Join(errs...)
}

func (s *Shaper) removeHierRedirect(d HierDirection, vethIdx, ifbIdx int) error {
	rs, err := s.readRedirectOn(d.vethHook(), vethIdx, ifbIdx)
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil // no clsact
		}
		return err
	}
	if rs.handle == 0 {
		return nil
	}
	if ifbIdx != 0 && rs.target != uint32(ifbIdx) {
		return nil // the pod's own pipeline's redirect
	}
	if ifbIdx == 0 {
		// The IFB is gone: a redirect to a device that no longer exists
		// drops every packet; one to a device that does is not ours here.
		if _, err := s.nl.LinkByIndex(int(rs.target)); err == nil {
			return nil
		}
	}
	if err := s.deleteFiltersOn(d.vethHook(), vethIdx, hookPrio(d.vethHook()), []uint32{rs.handle}, rs.conflict == ""); err != nil {
		return err
	}
	return s.deleteClsactIfUnused(vethIdx)
}

// RemoveHierarchy takes the hierarchy off the node (uninstall): every
// redirect to its IFBs first, from whatever link has one (a pod without
// a record included), then the IFBs. It returns the links it took a
// redirect off.
func (s *Shaper) RemoveHierarchy() ([]string, error) {
	ifbs := map[HierDirection]int{}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		l, err := s.linkOrNil(d.IFB())
		if err != nil {
			return nil, err
		}
		if l != nil {
			ifbs[d] = l.Attrs().Index
		}
	}
	if len(ifbs) == 0 {
		return nil, nil
	}
	qdiscs, err := s.qdiscs()
	if err != nil {
		return nil, err
	}
	var errs []error
	var touched []string
	for _, q := range qdiscs {
		if q.Kind != "clsact" {
			continue
		}
		for d, idx := range ifbs {
			rs, err := s.readRedirectOn(d.vethHook(), int(q.Ifindex), idx)
			if err != nil || rs.handle == 0 || rs.target != uint32(idx) {
				continue
			}
			if err := s.removeHierRedirect(d, int(q.Ifindex), idx); err != nil {
				errs = append(errs, err)
				continue
			}
			if l, err := s.nl.LinkByIndex(int(q.Ifindex)); err == nil {
				touched = append(touched, l.Attrs().Name)
			}
		}
	}
	if len(errs) > 0 {
		// A redirect left to a deleted IFB would drop the pod's packets.
		return touched, errors.Join(errs...)
	}
	return touched, errors.Join(s.deleteLink(HierarchyIngressIFB), s.deleteLink(HierarchyEgressIFB))
}

// readEntries fills st.Entries from the IFB's u32 entries: the addresses
// each class minor is found by.
func (s *Shaper) readEntries(d HierDirection, st *HierState) error {
	ifb, err := s.linkOrNil(d.IFB())
	if err != nil || ifb == nil {
		return err
	}
	filters, err := s.tc.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifb.Attrs().Index), Parent: rootHandle})
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("dump filters of %s: %w", d.IFB(), err)
	}
	st.Entries = map[uint16][]net.IP{}
	tables, links := map[uint32]bool{}, map[uint32]bool{}
	defer func() {
		for _, ht := range []uint32{hierHT4, hierHT6} {
			if tables[ht] && links[ht] {
				st.Tables++
			}
		}
	}()
	for _, f := range filters {
		ht := f.Handle >> 20
		if f.Kind == "u32" && f.U32 != nil {
			if f.U32.Divisor != nil && *f.U32.Divisor == hierDivisor && f.Handle == u32Handle(ht, 0, 0) {
				tables[ht] = true
			}
			if f.U32.Link != nil {
				links[*f.U32.Link>>20] = true
			}
		}
		if f.Kind != "u32" || isU32Structure(&f) || (ht != hierHT4 && ht != hierHT6) || f.U32 == nil || f.U32.ClassID == nil || f.U32.Sel == nil {
			continue
		}
		var b []byte
		for _, k := range f.U32.Sel.Keys {
			b = binary.NativeEndian.AppendUint32(b, k.Val)
		}
		if (ht == hierHT4 && len(b) != net.IPv4len) || (ht == hierHT6 && len(b) != net.IPv6len) {
			continue
		}
		minor := uint16(*f.U32.ClassID & 0xFFFF)
		st.Entries[minor] = append(st.Entries[minor], net.IP(b))
	}
	return nil
}

// ReadHierarchies reads both directions (full: with the address entries,
// ReadHierarchyFull).
func (s *Shaper) ReadHierarchies(full bool) (map[HierDirection]HierState, error) {
	out := map[HierDirection]HierState{}
	qd := &qdiscDump{s: s}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		read := s.readHierarchy
		if full {
			read = s.readHierarchyFull
		}
		st, err := read(d, qd)
		if err != nil {
			return nil, err
		}
		out[d] = st
	}
	return out, nil
}

// ReadHierarchyFull is ReadHierarchy with the address entries and the
// pod classes' queues.
func (s *Shaper) ReadHierarchyFull(d HierDirection) (HierState, error) {
	return s.readHierarchyFull(d, &qdiscDump{s: s})
}

func (s *Shaper) readHierarchyFull(d HierDirection, qd *qdiscDump) (HierState, error) {
	st, err := s.readHierarchy(d, qd)
	if err != nil {
		return st, err
	}
	if err := s.readEntries(d, &st); err != nil {
		return st, err
	}
	return st, s.readLeaves(d, qd, &st)
}

// readLeaves reads the queue under each pod class from the qdisc dump.
func (s *Shaper) readLeaves(d HierDirection, qd *qdiscDump, st *HierState) error {
	ifb, err := s.linkOrNil(d.IFB())
	if err != nil || ifb == nil {
		return err
	}
	qdiscs, err := qd.get()
	if err != nil {
		return err
	}
	st.leaves = map[uint16]leafRead{}
	for _, q := range qdiscs {
		minor := uint16(q.Parent & 0xFFFF)
		if q.Ifindex != uint32(ifb.Attrs().Index) || q.Parent>>16 != 1 || minor < MinMinor || minor > MaxMinor {
			continue
		}
		l := leafRead{kind: q.Kind}
		switch {
		case q.Kind == "bfifo" && q.Handle == core.BuildHandle(uint32(minor), 0) && q.Bfifo != nil:
			l.limit = uint64(q.Bfifo.Limit)
		case q.Kind == "tbf" && q.Handle == cutHandle(minor) && q.Tbf != nil && q.Tbf.Parms != nil:
			l.limit = uint64(q.Tbf.Parms.Limit)
		default:
			l.kind = fmt.Sprintf("%s %s", q.Kind, handleString(q.Handle))
		}
		st.leaves[minor] = l
	}
	return nil
}

// DiffMember lists what the kernel lacks of a member, read-only: its class
// in each direction it has one (parent, rate, ceil, priority) and the
// queue under it, the entries of its addresses and the redirects on its
// host veth. states come from
// ReadHierarchyFull (one read serves a pass over every member).
func (s *Shaper) DiffMember(g Guarantee, minor uint16, hostVeth string, ips []net.IP, states map[HierDirection]HierState) ([]string, error) {
	veth, err := s.linkOrNil(hostVeth)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		want := hierLeafOf(g.class(d))
		if want == nil {
			continue
		}
		st := states[d]
		have, ok := st.Classes[minor]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("%s: class 1:%x of %s is missing", d.IFB(), minor, hostVeth))
		case have.Guaranteed != (want.RateBytes > 0) || (want.RateBytes > 0 && have.Leaf.RateBytes != want.RateBytes) ||
			have.Leaf.CeilBytes != want.CeilBytes || have.Leaf.Prio != want.Prio:
			out = append(out, fmt.Sprintf("%s: class 1:%x of %s has rate %d ceil %d prio %d (guaranteed %v), want rate %d ceil %d prio %d",
				d.IFB(), minor, hostVeth, have.Leaf.RateBytes*8, have.Leaf.CeilBytes*8, have.Leaf.Prio, have.Guaranteed,
				want.RateBytes*8, want.CeilBytes*8, want.Prio))
		}
		if ok && veth != nil && st.leaves != nil {
			want := hierLeafQueue(want.QueueBytes, veth.Attrs().MTU).read()
			if have, ok := st.leaves[minor]; !ok || have != want {
				out = append(out, fmt.Sprintf("%s: the queue of class 1:%x of %s is %s, want %s of %d bytes",
					d.IFB(), minor, hostVeth, have.describe(ok), want.kind, want.limit))
			}
		}
		for _, ip := range ips {
			found := false
			for _, e := range st.Entries[minor] {
				found = found || e.Equal(ip)
			}
			if !found {
				out = append(out, fmt.Sprintf("%s: no entry sends %s to class 1:%x", d.IFB(), ip, minor))
			}
		}
		if veth == nil {
			continue
		}
		ifb, err := s.linkOrNil(d.IFB())
		if err != nil {
			return nil, err
		}
		rs, err := s.readRedirectOn(d.vethHook(), veth.Attrs().Index, linkIndex(ifb))
		if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return nil, err
		}
		if ifb == nil || rs.handle == 0 || rs.target != uint32(ifb.Attrs().Index) {
			out = append(out, fmt.Sprintf("%s does not hand its packets to %s", hostVeth, d.IFB()))
		}
	}
	return out, nil
}
