package shaping

import (
	"fmt"
	"math"

	tc "github.com/florianl/go-tc"
)

// The read side of the pipeline as pure functions over what go-tc decoded
// from the kernel's dumps, so that what this kernel cannot show (an
// fq_codel leaf) is covered by unit tests on the same code.

// qdiscRef names a qdisc as tc prints it, for messages.
type qdiscRef struct {
	kind   string
	handle uint32
}

func (q qdiscRef) String() string { return q.kind + " " + handleString(q.handle) }

func handleString(h uint32) string {
	if h&0xFFFF == 0 {
		return fmt.Sprintf("%x:", h>>16)
	}
	return fmt.Sprintf("%x:%x", h>>16, h&0xFFFF)
}

// fqCodelParams are the fq_codel options qoscni sets and compares.
type fqCodelParams struct {
	targetUs uint32
	limit    uint32 // packets
	memLimit uint32 // bytes of skb truesize
}

// fqCodelMaxMemory is fq_codel_change's cap on memory_limit.
const fqCodelMaxMemory = 1 << 31

// fqCodelFor derives the fq_codel leaf from the queue bound. The bound is
// what the README promises (rate x maxQueueDelay): memory_limit is the
// queue bound itself, and since the kernel charges each packet's truesize
// (buffer and metadata, more than its length) the queue holds less than
// that many bytes of packets. The packet limit is the bound in full
// frames, at least minQueueFrames, so small packets cannot pile up in
// thousands either. The target is half the delay budget (at least 1 ms),
// so codel starts dropping before the queue is full.
func fqCodelFor(rateBytes, limitBytes uint64, mtu int) fqCodelParams {
	frame := uint64(mtu + ethHeader)
	return fqCodelParams{
		targetUs: uint32(min(max(limitBytes*1_000_000/max(rateBytes, 1)/2, 1000), math.MaxUint32)),
		limit:    uint32(min(max(ceilDiv(limitBytes, frame), minQueueFrames), math.MaxUint32)),
		memLimit: uint32(min(limitBytes, math.MaxUint32)),
	}
}

// kernelKeeps is what fq_codel dumps for these options: the target is kept
// in codel time units of 1024 ns (CODEL_SHIFT) and read back in whole µs,
// the memory limit is capped.
func (p fqCodelParams) kernelKeeps() fqCodelParams {
	p.targetUs = uint32(((uint64(p.targetUs) * 1000 >> 10) << 10) / 1000)
	p.memLimit = min(p.memLimit, fqCodelMaxMemory)
	return p
}

// leafQdisc is the queue under class 1:1 of our shaper.
type leafQdisc struct {
	kind       string // "" = none: TBF's own FIFO, or HTB's default
	handle     uint32
	limitBytes uint64        // bfifo
	fq         fqCodelParams // fq_codel
}

func (l leafQdisc) String() string {
	switch l.kind {
	case "":
		return ""
	case "fq_codel":
		return fmt.Sprintf(", leaf fq_codel %s limit %dp memory %d B target %d µs", handleString(l.handle), l.fq.limit, l.fq.memLimit, l.fq.targetUs)
	case "bfifo":
		return fmt.Sprintf(", leaf bfifo %s limit %d B", handleString(l.handle), l.limitBytes)
	}
	return fmt.Sprintf(", leaf %s", qdiscRef{l.kind, l.handle})
}

// rootQdisc is the root qdisc of ifindex in a dump, nil if it has none (a
// device that is down shows none).
func rootQdisc(qdiscs []tc.Object, ifindex uint32) *tc.Object {
	for i := range qdiscs {
		if qdiscs[i].Ifindex == ifindex && qdiscs[i].Parent == tc.HandleRoot {
			return &qdiscs[i]
		}
	}
	return nil
}

// isKernelDefault: the kernel attaches a device's default root qdisc
// (noqueue on a veth, pfifo_fast or mq, or net.core.default_qdisc such as
// fq_codel) with handle 0, and every qdisc made through netlink gets a
// handle, so handle 0 proves nobody chose it. noqueue does nothing at
// all, so replacing it takes nothing from anyone.
func isKernelDefault(q *tc.Object) bool { return q.Handle == 0 || q.Kind == "noqueue" }

// isOurRoot: qoscni's shaper is always handle 1: and tbf or htb.
func isOurRoot(q *tc.Object) bool {
	return q.Handle == rootHandle && (q.Kind == "tbf" || q.Kind == "htb")
}

// decodeShape reads our shaper at the root of ifindex from a qdisc dump
// and, for HTB, the device's class dump. A root that is neither ours nor
// a kernel default comes back as foreign.
func decodeShape(qdiscs, classes []tc.Object, ifindex uint32) (*shape, *qdiscRef) {
	root := rootQdisc(qdiscs, ifindex)
	switch {
	case root == nil || isKernelDefault(root):
		return nil, nil
	case !isOurRoot(root):
		return nil, &qdiscRef{root.Kind, root.Handle}
	}
	sh := &shape{kind: root.Kind, leaf: decodeLeaf(qdiscs, ifindex)}
	if root.Kind == "tbf" {
		if root.Tbf == nil || root.Tbf.Parms == nil {
			return sh, nil
		}
		p := root.Tbf.Parms
		sh.rateBytes = uint64(p.Rate.Rate)
		sh.burstTicks = p.Buffer
		sh.burstBytes = ticksToBytes(p.Buffer, sh.rateBytes)
		sh.limitBytes = uint64(p.Limit)
		if pr := uint64(p.PeakRate.Rate); pr != 0 {
			sh.peakBytes, sh.peakTicks = pr, p.Mtu
		}
		return sh, nil
	}
	for _, c := range classes {
		if c.Ifindex != ifindex || c.Handle != classHandle || c.Htb == nil || c.Htb.Parms == nil {
			continue
		}
		sh.rateBytes = uint64(c.Htb.Parms.Rate.Rate)
		if c.Htb.Rate64 != nil && *c.Htb.Rate64 != 0 {
			sh.rateBytes = *c.Htb.Rate64
		}
		sh.burstTicks = c.Htb.Parms.Buffer
		sh.burstBytes = ticksToBytes(c.Htb.Parms.Buffer, sh.rateBytes)
	}
	// HTB has no queue bound of its own: the leaf's is the one to show.
	switch sh.leaf.kind {
	case "bfifo":
		sh.limitBytes = sh.leaf.limitBytes
	case "fq_codel":
		sh.limitBytes = uint64(sh.leaf.fq.memLimit)
	}
	return sh, nil
}

func decodeLeaf(qdiscs []tc.Object, ifindex uint32) leafQdisc {
	for _, q := range qdiscs {
		if q.Ifindex != ifindex || q.Parent != classHandle {
			continue
		}
		l := leafQdisc{kind: q.Kind, handle: q.Handle}
		switch {
		case q.Kind == "bfifo" && q.Bfifo != nil:
			l.limitBytes = uint64(q.Bfifo.Limit)
		case q.Kind == "fq_codel" && q.FqCodel != nil:
			l.fq = fqCodelParams{targetUs: deref(q.FqCodel.Target), limit: deref(q.FqCodel.Limit), memLimit: deref(q.FqCodel.MemoryLimit)}
		}
		return l
	}
	return leafQdisc{}
}

func deref(p *uint32) uint32 {
	if p == nil {
		return 0
	}
	return *p
}
