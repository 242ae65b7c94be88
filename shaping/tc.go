package shaping

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	tc "github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/fault"
	"github.com/qoscni/qoscni/internal/tcdump"
)

// Handles and constants of the pipeline. The shaping qdisc is always 1: at
// the root of its device, so the agent and humans find it in one place.
var (
	rootHandle  = core.BuildHandle(1, 0)
	classHandle = core.BuildHandle(1, 1)
	leafHandle  = core.BuildHandle(0x10, 0)
	// leafHandleAlt takes turns with leafHandle when a queue is replaced.
	leafHandleAlt = core.BuildHandle(0x11, 0)
	// clsact's ingress hook, where the redirect to the IFB sits.
	clsactHandle = core.BuildHandle(0xFFFF, 0)
	ingressHook  = core.BuildHandle(0xFFFF, tc.HandleMinIngress)
)

const (
	ethPAll      = 0x0003
	linkEthernet = 1 // TC_LINKLAYER_ETHERNET: rate tables not needed
	// psched ticks are 64 ns (PSCHED_SHIFT 6).
	pschedShift = 6
	// htbQuantum bounds the bytes a class sends per round; HTB's own
	// default (rate/r2q) overflows its 200000 cap at the rates HTB is
	// used for here.
	htbQuantum = 200000
	// ifbTxQueueLen only matters if our root qdisc is deleted by hand:
	// the kernel's default qdisc then queues at most this many packets.
	ifbTxQueueLen = 1000
	// tcActStolen/egressRedir: mirred "egress redirect" that consumes the packet.
	tcActStolen = 4
	egressRedir = 1
	u32Terminal = 1
)

// Desired is the whole pipeline of one attachment.
type Desired struct {
	HostVeth string
	IFB      string
	MTU      int
	Plan     Plan
	// HierEgress: the pod's egress goes to the node hierarchy, whose
	// redirect sits where the pipeline's own would (the veth's ingress
	// hook): without an egress of its own the pipeline leaves it alone.
	HierEgress bool
}

// Shaper reads and changes the pipeline in one network namespace.
type Shaper struct {
	tc *tc.Tc
	nl *netlink.Handle
	// rt is a plain rtnetlink socket for the requests go-tc does not make
	// (one class by handle: getHierClass).
	rt *mnl.Conn
	// ns is the namespace file OpenNetns opened, closed with the sockets.
	ns *os.File
	// noFqCodel is set once the kernel said it has no fq_codel.
	noFqCodel bool
	// pass holds one qdisc dump shared by the Apply calls of a pass over
	// many attachments (see BeginPass); nil outside a pass.
	pass []tc.Object
}

// BeginPass takes one qdisc dump for the Apply and Diff calls that follow,
// until EndPass: a pass over N attachments then costs one dump, not N.
// Each call still reads its own devices' links, classes and filters, and
// only changes its own devices, so the shared dump stays right for the
// others.
func (s *Shaper) BeginPass() error {
	q, err := s.qdiscs()
	if err != nil {
		return err
	}
	s.pass = q
	return nil
}

// EndPass drops the shared dump.
func (s *Shaper) EndPass() { s.pass = nil }

// Open connects to the namespace nsFd (-1 = the current one).
func Open(nsFd int) (*Shaper, error) {
	cfg := &tc.Config{}
	var h *netlink.Handle
	var err error
	if nsFd >= 0 {
		cfg.NetNS = nsFd
		h, err = netlink.NewHandleAt(netns.NsHandle(nsFd))
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	t, err := tc.Open(cfg)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("open tc netlink: %w", err)
	}
	rt, err := mnl.Dial(unix.NETLINK_ROUTE, &mnl.Config{NetNS: cfg.NetNS})
	if err != nil {
		t.Close()
		h.Close()
		return nil, fmt.Errorf("open rtnetlink: %w", err)
	}
	// Extended acks carry the kernel's reason for a refusal.
	_ = t.SetOption(0xb /* NETLINK_EXT_ACK */, true)
	_ = rt.SetOption(mnl.ExtendedAcknowledge, true)
	return &Shaper{tc: t, nl: h, rt: rt}, nil
}

// OpenNetns is Open in the network namespace at path (a bind mount such
// as /run/netns/NAME, or /proc/PID/ns/net).
func OpenNetns(path string) (*Shaper, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open network namespace: %w", err)
	}
	s, err := Open(int(f.Fd()))
	if err != nil {
		f.Close()
		return nil, err
	}
	s.ns = f
	return s, nil
}

// Close releases the sockets.
func (s *Shaper) Close() {
	s.tc.Close()
	s.nl.Close()
	s.rt.Close()
	if s.ns != nil {
		s.ns.Close()
	}
}

// shape is a shaping qdisc: as wanted (wantShape) or as read back from
// the kernel (decodeShape).
type shape struct {
	kind       string
	rateBytes  uint64
	burstBytes uint64
	// burstTicks is the burst as the kernel keeps it: time at the rate,
	// in 64 ns ticks, at most 32 bits. Comparisons use it.
	burstTicks uint32
	// limitBytes is the queue bound: TBF's own limit, and the leaf's for
	// HTB (shown only; the leaf is compared on its own terms).
	limitBytes uint64
	// peakBytes and peakTicks are TBF's peak rate and peak bucket (0 = none).
	peakBytes uint64
	peakTicks uint32
	// fq is what an fq_codel leaf gets (wanted shapes only).
	fq fqCodelParams
	// leaf is the queue under the shaper (read shapes only).
	leaf leafQdisc
}

func (sh *shape) String() string {
	if sh == nil {
		return "none"
	}
	return fmt.Sprintf("%s rate %d bit/s burst %d B limit %d B%s", sh.kind, sh.rateBytes*8, sh.burstBytes, sh.limitBytes, sh.leaf)
}

func wantShape(p *Params, mtu int) *shape {
	if p == nil {
		return nil
	}
	if mtu == 0 {
		mtu = 1500
	}
	kind := "tbf"
	if p.RateBytes() > math.MaxUint32 {
		// TBF's rate is 32-bit in go-tc; HTB carries 64-bit rates.
		kind = "htb"
	}
	rate := p.RateBytes()
	burst := min(p.BurstBytes, maxBurstBytes(rate))
	sh := &shape{kind: kind, rateBytes: rate, burstBytes: burst,
		burstTicks: bytesToTicks(burst, rate), limitBytes: p.LimitBytes,
		fq: fqCodelFor(rate, p.LimitBytes, mtu)}
	switch {
	case kind == "tbf" && p.PeakBits != 0:
		// The pod's own peak, measured over its minburst: at least a frame
		// of the device, or TBF could send no full frame at all.
		sh.peakBytes = p.PeakBits / 8
		sh.peakTicks = bytesToTicks(max(p.MinBurstBytes, uint64(mtu+ethHeader)), sh.peakBytes)
	case kind == "tbf" && UsesPeak(sh.rateBytes, sh.limitBytes):
		sh.peakBytes = PeakBytes(sh.rateBytes)
		sh.peakTicks = bytesToTicks(PeakBurst(mtu), sh.peakBytes)
	}
	return sh
}

// maxBurstBytes is the deepest bucket the kernel can report at a rate:
// TBF takes the burst in bytes and keeps it as 64-bit nanoseconds, but
// dumps it as 32-bit psched ticks, which wrap above 2^32 ticks (about
// 275 s); HTB takes ticks in the first place. A deeper bucket read back
// wrapped would make CHECK fail right after ADD and the agent repair it
// for ever, so the shape is clamped here, where ADD, CHECK and repair all
// build it. A bucket of 275 s of the rate already lets a pod send
// unshaped for minutes; nothing is lost that anyone should want.
func maxBurstBytes(rateBytes uint64) uint64 {
	hi, lo := bits.Mul64(uint64(math.MaxUint32)<<pschedShift, rateBytes)
	if hi >= 1_000_000_000 {
		return math.MaxUint64 // no such rate (above 2^62 bytes/s)
	}
	q, _ := bits.Div64(hi, lo, 1_000_000_000)
	return q
}

// maxPacket is the largest packet the shaper sends whole (bigger GSO
// packets are cut first): the peak bucket when there is one, else the burst.
func (sh *shape) maxPacket() uint64 {
	if sh.peakBytes != 0 {
		return ticksToBytes(sh.peakTicks, sh.peakBytes)
	}
	return sh.burstBytes
}

// matches reports whether have, as read from the kernel, is this wanted
// shape, with the precision the kernel keeps: the burst goes through a
// conversion to time and back.
func (sh *shape) matches(have *shape) bool {
	if sh == nil || have == nil {
		return sh == have
	}
	near := func(a, b uint32) bool {
		d := math.Abs(float64(a) - float64(b))
		return d <= 1 || d <= float64(max(a, b))*0.002
	}
	if sh.kind != have.kind || sh.rateBytes != have.rateBytes || !near(sh.burstTicks, have.burstTicks) ||
		sh.peakBytes != have.peakBytes || !near(sh.peakTicks, have.peakTicks) {
		return false
	}
	if sh.kind == "tbf" && sh.limitBytes != have.limitBytes {
		return false
	}
	return sh.leafMatches(have.leaf)
}

// leafMatches compares the queue under the shaper with what qoscni would
// put there: whichever of its two leaves the kernel has, with the bound
// this shape asks for.
func (sh *shape) leafMatches(l leafQdisc) bool {
	switch l.kind {
	case "fq_codel":
		return l.fq == sh.fq.kernelKeeps()
	case "bfifo":
		return l.limitBytes == sh.limitBytes
	case "":
		// TBF's own FIFO holds its limit; HTB's default leaf is a pfifo
		// of the device's txqueuelen, not bounded by the budget.
		return sh.kind == "tbf"
	}
	return false
}

// kstate is what the kernel has for one attachment.
type kstate struct {
	veth, ifb   netlink.Link
	ingress     *shape    // root of the veth
	egress      *shape    // root of the IFB
	foreignRoot *qdiscRef // a root qdisc on the veth that is neither ours nor the kernel's default
	clsact      bool
	redirect    redirectState
}

func (s *Shaper) linkOrNil(name string) (netlink.Link, error) {
	if name == "" {
		return nil, nil
	}
	l, err := s.nl.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up %s: %w", name, err)
	}
	return l, nil
}

// read collects the kernel's view with one qdisc dump (plus a class dump
// for HTB and a filter dump on the veth's ingress hook).
func (s *Shaper) read(d Desired) (*kstate, error) {
	st := &kstate{}
	var err error
	if st.veth, err = s.linkOrNil(d.HostVeth); err != nil {
		return nil, err
	}
	if st.ifb, err = s.linkOrNil(d.IFB); err != nil {
		return nil, err
	}
	if st.veth == nil && st.ifb == nil {
		return st, nil
	}
	qdiscs := s.pass
	if qdiscs == nil {
		if qdiscs, err = s.qdiscs(); err != nil {
			return nil, err
		}
	}
	if st.veth != nil {
		idx := st.veth.Attrs().Index
		st.ingress, st.foreignRoot, err = s.readShape(qdiscs, uint32(idx))
		if err != nil {
			return nil, err
		}
		st.clsact = hasClsact(qdiscs, uint32(idx))
		if st.clsact {
			if st.redirect, err = s.readRedirect(idx, linkIndex(st.ifb)); err != nil {
				return nil, err
			}
		}
	}
	if st.ifb != nil {
		if st.egress, _, err = s.readShape(qdiscs, uint32(st.ifb.Attrs().Index)); err != nil {
			return nil, err
		}
	}
	return st, nil
}

func linkIndex(l netlink.Link) int {
	if l == nil {
		return 0
	}
	return l.Attrs().Index
}

func hasClsact(qdiscs []tc.Object, ifindex uint32) bool {
	for _, q := range qdiscs {
		if q.Ifindex == ifindex && q.Kind == "clsact" {
			return true
		}
	}
	return false
}

func ticksToBytes(ticks uint32, rateBytes uint64) uint64 {
	ns := float64(uint64(ticks) << pschedShift)
	return uint64(math.Round(ns * float64(rateBytes) / 1e9))
}

func bytesToTicks(b, rateBytes uint64) uint32 {
	if rateBytes == 0 {
		return 0
	}
	ticks := float64(b) * 1e9 / float64(rateBytes) / float64(uint64(1)<<pschedShift)
	return uint32(min(math.Ceil(ticks), math.MaxUint32))
}

// readShape finds our shaping qdisc at the root of ifindex, dumping the
// device's classes only when it is HTB. A root qdisc that is not ours is
// returned as foreign so callers never write or delete it.
func (s *Shaper) readShape(qdiscs []tc.Object, ifindex uint32) (*shape, *qdiscRef, error) {
	var classes []tc.Object
	if r := rootQdisc(qdiscs, ifindex); r != nil && isOurRoot(r) && r.Kind == "htb" {
		var err error
		if classes, err = tcdump.Classes(s.rt, ifindex); err != nil {
			return nil, nil, err
		}
	}
	sh, foreign := decodeShape(qdiscs, classes, ifindex)
	return sh, foreign, nil
}

// Diff reports every difference between d and the kernel, read-only (CHECK).
func (s *Shaper) Diff(d Desired) ([]string, error) {
	st, err := s.read(d)
	if err != nil {
		return nil, err
	}
	return plan(d, st).describe(), nil
}

// Apply makes the kernel match d, changing only what differs, in place:
// a changed rate is a qdisc replace on the live device, no link flap.
func (s *Shaper) Apply(d Desired) ([]string, error) {
	st, err := s.read(d)
	if err != nil {
		return nil, err
	}
	acts := plan(d, st)
	return acts.describe(), acts.run(s, d, st)
}

// ApplyFresh sets up the pipeline on a veth that was just created, without
// reading first (the ADD path: nothing can be there yet).
func (s *Shaper) ApplyFresh(d Desired) error {
	st := &kstate{}
	var err error
	if st.veth, err = s.linkOrNil(d.HostVeth); err != nil {
		return err
	}
	if st.veth == nil {
		return fmt.Errorf("shape %s: no such interface", d.HostVeth)
	}
	if st.ifb, err = s.linkOrNil(d.IFB); err != nil {
		return err
	}
	return plan(d, st).run(s, d, st)
}

type action struct {
	what string
	do   func(s *Shaper, d Desired, st *kstate) error
}

type actions []action

func (a actions) describe() []string {
	out := make([]string, 0, len(a))
	for _, x := range a {
		out = append(out, x.what)
	}
	return out
}

func (a actions) run(s *Shaper, d Desired, st *kstate) error {
	for i, x := range a {
		if err := x.do(s, d, st); err != nil {
			var cerr *types.Error
			if errors.As(err, &cerr) {
				return err // a refusal already says what and where
			}
			return fmt.Errorf("%s: %w", x.what, err)
		}
		fault.At("shape", strconv.Itoa(i+1))
	}
	return nil
}

// refusals names what sits where qoscni would write and is not qoscni's.
func refusals(d Desired, st *kstate) []string {
	var out []string
	if d.Plan.Ingress != nil && st.foreignRoot != nil {
		out = append(out, fmt.Sprintf("host veth %s has a root qdisc %s that qoscni did not create; qoscni shapes traffic into the pod there and does not replace it (remove it, or shape this pod without an ingress rate)",
			d.HostVeth, st.foreignRoot))
	}
	if d.Plan.Egress != nil && st.redirect.conflict != "" {
		out = append(out, fmt.Sprintf("priority %d of the ingress hook of host veth %s holds %s that qoscni did not create; qoscni puts its egress redirect at that priority and does not replace it",
			redirectPrio, d.HostVeth, st.redirect.conflict))
	}
	return out
}

// plan is the one comparison routine: CHECK reports its actions, ADD, the
// agent's reshaping and drift repair run them.
func plan(d Desired, st *kstate) actions {
	var acts actions
	if st.veth == nil {
		return actions{{what: fmt.Sprintf("host veth %s is missing", d.HostVeth), do: func(*Shaper, Desired, *kstate) error {
			return fmt.Errorf("interface %s does not exist", d.HostVeth)
		}}}
	}
	// Before any change, so that a refused ADD leaves nothing behind.
	if r := refusals(d, st); len(r) > 0 {
		msg := strings.Join(r, "; ")
		return actions{{what: msg, do: func(*Shaper, Desired, *kstate) error {
			return types.NewError(types.ErrInvalidNetworkConfig, msg, "")
		}}}
	}
	in := wantShape(d.Plan.Ingress, d.MTU)
	switch {
	case in == nil && st.ingress != nil:
		acts = append(acts, action{fmt.Sprintf("remove ingress shaping (%s) from %s", st.ingress, d.HostVeth), func(s *Shaper, d Desired, st *kstate) error {
			return s.deleteRoot(st.veth.Attrs().Index, st.ingress.kind)
		}})
	case in != nil && !in.matches(st.ingress):
		acts = append(acts, action{fmt.Sprintf("shape traffic into the pod on %s: have %s, want %s", d.HostVeth, st.ingress, in), func(s *Shaper, d Desired, st *kstate) error {
			return s.setShape(st.veth.Attrs().Index, in, st.ingress)
		}})
	}

	eg := wantShape(d.Plan.Egress, d.MTU)
	if eg == nil {
		if st.redirect.any() && !d.HierEgress {
			acts = append(acts, action{fmt.Sprintf("remove the egress redirect from %s", d.HostVeth), func(s *Shaper, d Desired, st *kstate) error {
				return s.removeRedirect(st.veth.Attrs().Index, st.redirect)
			}})
		}
		if st.ifb != nil {
			acts = append(acts, action{fmt.Sprintf("delete IFB %s", d.IFB), func(s *Shaper, d Desired, st *kstate) error {
				return s.deleteLink(d.IFB)
			}})
		}
		return acts
	}
	if st.ifb == nil {
		acts = append(acts, action{fmt.Sprintf("create IFB %s", d.IFB), func(s *Shaper, d Desired, st *kstate) error {
			l, err := s.createIFB(d.IFB, d.MTU)
			st.ifb = l
			return err
		}})
	} else {
		if d.MTU != 0 && st.ifb.Attrs().MTU != d.MTU {
			acts = append(acts, action{fmt.Sprintf("set IFB %s MTU %d (has %d)", d.IFB, d.MTU, st.ifb.Attrs().MTU), func(s *Shaper, d Desired, st *kstate) error {
				return s.nl.LinkSetMTU(st.ifb, d.MTU)
			}})
		}
		if st.ifb.Attrs().Flags&net.FlagUp == 0 {
			acts = append(acts, action{fmt.Sprintf("set IFB %s up", d.IFB), func(s *Shaper, d Desired, st *kstate) error {
				return s.nl.LinkSetUp(st.ifb)
			}})
		}
	}
	if !eg.matches(st.egress) {
		acts = append(acts, action{fmt.Sprintf("shape traffic out of the pod on %s: have %s, want %s", d.IFB, st.egress, eg), func(s *Shaper, d Desired, st *kstate) error {
			return s.setShape(st.ifb.Attrs().Index, eg, st.egress)
		}})
	}
	if !st.clsact {
		acts = append(acts, action{fmt.Sprintf("add clsact to %s", d.HostVeth), func(s *Shaper, d Desired, st *kstate) error {
			return s.addClsact(st.veth.Attrs().Index)
		}})
	}
	switch rs := st.redirect; {
	case rs.handle == 0:
		acts = append(acts, action{fmt.Sprintf("redirect traffic from the pod on %s to %s", d.HostVeth, d.IFB), func(s *Shaper, d Desired, st *kstate) error {
			return s.addRedirect(st.veth.Attrs().Index, st.ifb.Attrs().Index)
		}})
	case st.ifb == nil || rs.target != uint32(st.ifb.Attrs().Index):
		acts = append(acts, action{fmt.Sprintf("redirect traffic from the pod on %s to %s (redirects to ifindex %d)", d.HostVeth, d.IFB, rs.target), func(s *Shaper, d Desired, st *kstate) error {
			return s.retargetRedirect(st.veth.Attrs().Index, st.ifb.Attrs().Index, st.redirect.handle)
		}})
	}
	if len(st.redirect.legacy) > 0 {
		// After ours is in place: the pod's traffic stays shaped throughout.
		acts = append(acts, action{fmt.Sprintf("remove the unmarked redirect of an older qoscni from %s", d.HostVeth), func(s *Shaper, d Desired, st *kstate) error {
			return s.removeLegacy(st.veth.Attrs().Index, st.redirect)
		}})
	}
	return acts
}

func (s *Shaper) createIFB(name string, mtu int) (netlink.Link, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	attrs.MTU = mtu
	attrs.TxQLen = ifbTxQueueLen
	if err := s.nl.LinkAdd(&netlink.Ifb{LinkAttrs: attrs}); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("create IFB %s: %w", name, err)
	}
	l, err := s.nl.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("look up IFB %s: %w", name, err)
	}
	if err := s.nl.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set IFB %s up: %w", name, err)
	}
	return l, nil
}

func (s *Shaper) deleteLink(name string) error {
	l, err := s.linkOrNil(name)
	if err != nil || l == nil {
		return err
	}
	if err := s.nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

func msg(ifindex int, handle, parent, info uint32) tc.Msg {
	return tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifindex), Handle: handle, Parent: parent, Info: info}
}

// setShape installs or changes the root shaper. Same kind: replace in
// place (the kernel keeps the qdisc and its queue). Other kind: the old
// root goes first, the kernel refuses a kind change under one handle.
func (s *Shaper) setShape(ifindex int, want, have *shape) error {
	if have != nil && have.kind != want.kind {
		if err := s.deleteRoot(ifindex, have.kind); err != nil {
			return err
		}
		have = nil
	}
	var leaf leafQdisc
	if have != nil {
		leaf = have.leaf
	}
	if want.kind == "tbf" {
		return s.setTBF(ifindex, want, have, leaf)
	}
	return s.setHTB(ifindex, want, have != nil, leaf)
}

func (s *Shaper) setTBF(ifindex int, want, have *shape, leaf leafQdisc) error {
	burst := uint32(min(want.burstBytes, math.MaxUint32))
	tbf := &tc.Tbf{
		Parms: &tc.TbfQopt{
			Rate:   tc.RateSpec{Rate: uint32(want.rateBytes), Linklayer: linkEthernet},
			Limit:  uint32(min(want.limitBytes, math.MaxUint32)),
			Buffer: bytesToTicks(want.burstBytes, want.rateBytes),
		},
		Burst: &burst,
	}
	if want.peakBytes != 0 {
		pburst := uint32(ticksToBytes(want.peakTicks, want.peakBytes))
		tbf.Parms.PeakRate = tc.RateSpec{Rate: uint32(want.peakBytes), Linklayer: linkEthernet}
		tbf.Parms.Mtu = want.peakTicks
		tbf.Pburst = &pburst
	}
	q := &tc.Object{Msg: msg(ifindex, rootHandle, tc.HandleRoot, 0), Attribute: tc.Attribute{Kind: "tbf", Tbf: tbf}}
	if err := s.tc.Qdisc().Replace(q); err != nil {
		return fmt.Errorf("replace tbf on ifindex %d: %w", ifindex, err)
	}
	if have != nil && want.maxPacket() < have.maxPacket() {
		// TBF keeps its queue across a change. A queued packet longer than
		// the new largest packet (burst or peak bucket) can never collect
		// enough tokens and would block the pod's traffic for good, so a
		// smaller burst starts on a fresh queue: grafting a new leaf drops
		// the old one's packets (at most one delay budget's worth, which
		// TCP retransmits).
		return s.graftLeaf(ifindex, want, leaf.handle)
	}
	return s.setLeaf(ifindex, want, leaf, true)
}

// otherLeafHandle is the handle a new leaf takes: one the current leaf
// does not have, so the kernel grafts it in place of the old one.
func otherLeafHandle(current uint32) uint32 {
	if current == leafHandle {
		return leafHandleAlt
	}
	return leafHandle
}

// graftLeaf puts a new queue under the shaper with a handle other than the
// current one, so the kernel replaces (and empties) the old queue instead
// of changing it in place.
func (s *Shaper) graftLeaf(ifindex int, want *shape, current uint32) error {
	handle := otherLeafHandle(current)
	if !s.noFqCodel {
		if err := s.replaceFqCodel(ifindex, want, handle); err == nil {
			return nil
		} else if !errors.Is(err, errNoFqCodel) {
			return err
		}
	}
	return s.replaceBfifo(ifindex, want, handle)
}

func (s *Shaper) setHTB(ifindex int, want *shape, haveRoot bool, leaf leafQdisc) error {
	// HTB has no qdisc-level change: an existing root stays, its class changes.
	if !haveRoot {
		if err := s.addHTBRoot(ifindex); err != nil {
			return err
		}
	}
	rate32 := uint32(min(want.rateBytes, math.MaxUint32))
	ticks := bytesToTicks(want.burstBytes, want.rateBytes)
	rate64 := want.rateBytes
	class := &tc.Object{Msg: msg(ifindex, classHandle, rootHandle, 0), Attribute: tc.Attribute{Kind: "htb", Htb: &tc.Htb{
		Parms: &tc.HtbOpt{
			Rate:    tc.RateSpec{Rate: rate32, Linklayer: linkEthernet},
			Ceil:    tc.RateSpec{Rate: rate32, Linklayer: linkEthernet},
			Buffer:  ticks,
			Cbuffer: ticks,
			Quantum: htbQuantum,
		},
		Rate64: &rate64,
		Ceil64: &rate64,
	}}}
	if err := s.tc.Class().Replace(class); err != nil {
		return fmt.Errorf("replace htb class on ifindex %d: %w", ifindex, err)
	}
	return s.setLeaf(ifindex, want, leaf, false)
}

func (s *Shaper) addHTBRoot(ifindex int) error {
	root := &tc.Object{Msg: msg(ifindex, rootHandle, tc.HandleRoot, 0), Attribute: tc.Attribute{Kind: "htb", Htb: &tc.Htb{
		Init: &tc.HtbGlob{Version: 3, Rate2Quantum: 10, Defcls: 1},
	}}}
	if err := s.tc.Qdisc().Replace(root); err != nil {
		return fmt.Errorf("add htb to ifindex %d: %w", ifindex, err)
	}
	return nil
}

// setLeaf puts the queue under the shaper: fq_codel where the kernel has it
// (flow isolation and a delay target), otherwise a byte FIFO bounded by the
// delay budget; TBF already has that FIFO inside, so it needs no leaf of
// ours without fq_codel. A leaf of the kind wanted is changed in place
// under its own handle, which keeps its queue: a request for another
// handle would graft a new leaf and drop every queued packet, and one for
// another kind under the same handle is refused by the kernel.
func (s *Shaper) setLeaf(ifindex int, want *shape, cur leafQdisc, tbfHasFifo bool) error {
	if !s.noFqCodel {
		handle := otherLeafHandle(cur.handle)
		if cur.kind == "fq_codel" {
			handle = cur.handle
		}
		err := s.replaceFqCodel(ifindex, want, handle)
		if err == nil || !errors.Is(err, errNoFqCodel) {
			return err
		}
	}
	switch {
	case cur.kind == "bfifo":
		return s.replaceBfifo(ifindex, want, cur.handle)
	case cur.kind == "" && tbfHasFifo:
		return nil
	}
	return s.replaceBfifo(ifindex, want, otherLeafHandle(cur.handle))
}

var errNoFqCodel = errors.New("kernel has no fq_codel")

func (s *Shaper) replaceFqCodel(ifindex int, want *shape, handle uint32) error {
	p := want.fq
	leaf := &tc.Object{Msg: msg(ifindex, handle, classHandle, 0), Attribute: tc.Attribute{Kind: "fq_codel", FqCodel: &tc.FqCodel{
		Target: &p.targetUs, Limit: &p.limit, MemoryLimit: &p.memLimit,
	}}}
	err := s.tc.Qdisc().Replace(leaf)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
		// This kernel has no fq_codel: remember, fall back to the FIFO.
		s.noFqCodel = true
		return errNoFqCodel
	}
	return fmt.Errorf("replace fq_codel leaf on ifindex %d: %w", ifindex, err)
}

func (s *Shaper) replaceBfifo(ifindex int, want *shape, handle uint32) error {
	leaf := &tc.Object{Msg: msg(ifindex, handle, classHandle, 0), Attribute: tc.Attribute{Kind: "bfifo", Bfifo: &tc.FifoOpt{
		Limit: uint32(min(want.limitBytes, math.MaxUint32)),
	}}}
	if err := s.tc.Qdisc().Replace(leaf); err != nil {
		return fmt.Errorf("replace bfifo leaf on ifindex %d: %w", ifindex, err)
	}
	return nil
}

// HasFqCodel reports whether the last leaf set-up found fq_codel.
func (s *Shaper) HasFqCodel() bool { return !s.noFqCodel }

func (s *Shaper) deleteRoot(ifindex int, kind string) error {
	// The kernel matches the kind on delete and ignores options, but go-tc
	// wants a value to marshal for it.
	attr := tc.Attribute{Kind: kind}
	switch kind {
	case "tbf":
		attr.Tbf = &tc.Tbf{Parms: &tc.TbfQopt{}}
	case "htb":
		attr.Htb = &tc.Htb{}
	}
	err := s.tc.Qdisc().Delete(&tc.Object{Msg: msg(ifindex, rootHandle, tc.HandleRoot, 0), Attribute: attr})
	if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete root qdisc of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// addClsact adds the clsact qdisc unless one is there (then it may be the
// main plugin's, and is shared).
func (s *Shaper) addClsact(ifindex int) error {
	q := &tc.Object{Msg: msg(ifindex, clsactHandle, tc.HandleIngress, 0), Attribute: tc.Attribute{Kind: "clsact"}}
	if err := s.tc.Qdisc().Add(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact to ifindex %d: %w", ifindex, err)
	}
	return nil
}

// Remove takes the attachment's shaping away: our shaper and redirect off
// the host veth when it still exists (chained mode: the veth belongs to
// the main plugin and outlives us, with whatever else it carries), then
// the IFB. Idempotent.
func (s *Shaper) Remove(hostVeth, ifb string) error {
	var errs []error
	veth, err := s.linkOrNil(hostVeth)
	if err != nil {
		errs = append(errs, err)
	}
	ifbLink, err := s.linkOrNil(ifb)
	if err != nil {
		errs = append(errs, err)
	}
	if veth != nil {
		if err := s.removeFromVeth(veth.Attrs().Index, linkIndex(ifbLink)); err != nil {
			errs = append(errs, err)
		}
	}
	// After the redirect: a redirect to a deleted device drops every packet.
	if err := s.deleteLink(ifb); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (s *Shaper) removeFromVeth(idx, ifbIndex int) error {
	qdiscs, err := s.qdiscs()
	if err != nil {
		return err
	}
	var errs []error
	if sh, _, err := s.readShape(qdiscs, uint32(idx)); err != nil {
		errs = append(errs, err)
	} else if sh != nil {
		errs = append(errs, s.deleteRoot(idx, sh.kind))
	}
	if hasClsact(qdiscs, uint32(idx)) {
		rs, err := s.readRedirect(idx, ifbIndex)
		switch {
		case err != nil:
			errs = append(errs, err)
		case rs.any():
			errs = append(errs, s.removeRedirect(idx, rs))
		case ifbIndex != 0:
			// An ADD that got as far as the IFB (made before the clsact)
			// and died before the redirect leaves an empty clsact. Without
			// an IFB nothing of ours was made, and an empty clsact is the
			// main plugin's to keep (a refused ADD's rollback).
			errs = append(errs, s.deleteClsactIfUnused(idx))
		}
	}
	return errors.Join(errs...)
}

// qdiscs dumps the namespace's qdiscs with tcdump: go-tc's dump fails on
// any qdisc of the node it cannot decode, such as a cutting leaf's TBF,
// whose rate the kernel sends as a 64-bit attribute (and its class dump
// on that TBF's class, which has no counters).
func (s *Shaper) qdiscs() ([]tc.Object, error) {
	q, err := tcdump.Qdiscs(s.rt)
	return tcdump.Objects(q), err
}
