package shaping

import (
	"bytes"
	"errors"
	"fmt"

	tc "github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"golang.org/x/sys/unix"
)

// The egress redirect shares the host veth's clsact qdisc with whatever
// the main plugin attached there (in chained mode Calico eBPF and Cilium
// put their programs on the same ingress hook). qoscni's filter is the one
// that has all three of:
//   - its own priority (redirectPrio), where a tc filter lives alone:
//     the kernel keeps one classifier per priority and protocol, so
//     adding or deleting there never touches another priority;
//   - its own u32 key node id (redirectNode), so it is one exact handle;
//   - the TC action cookie redirectCookie on its mirred action: an opaque
//     value the kernel stores and dumps with the action and that nobody
//     else has a reason to write, so a filter another tool happened to put
//     at the same priority is never taken for ours.
// Anything else at that priority is someone else's: qoscni refuses to
// redirect rather than replace it. Filters at other priorities and on the
// egress hook are never written or deleted, and the clsact qdisc goes only
// when nothing at all is left on either hook.

const (
	// redirectPrio runs after the filters a main plugin attaches at fixed
	// low priorities (Cilium's 1) or at tc's automatic ones (counting
	// down from 49152). Order matters: a packet sent back by the IFB skips
	// the ingress hook entirely (ifb sets tc_skip_classify), so a filter
	// after ours would never see the pod's traffic, and whatever policy
	// the main plugin enforces there would be bypassed. The price: a
	// program before ours that ends classification (TC_ACT_OK) keeps those
	// packets from being shaped.
	redirectPrio = 0xFFF0
	// redirectNode is our key's node id in the u32 hash table of that
	// priority (u32 handles are table:bucket:node; the kernel chooses
	// the table).
	redirectNode = 0x51
	// legacyRedirectPrio is where qoscni put its redirect before it had a
	// priority and a cookie of its own (priority 1, shared with anyone).
	legacyRedirectPrio = 1
)

// intoPodRedirectPrio is the priority of the node hierarchy's redirect on
// the veth's egress hook (traffic into the pod). Not redirectPrio: u32
// keeps its hash tables per qdisc, not per hook, so the two hooks of one
// clsact share them, and a dump of either hook lists every u32 filter of
// the priority asked for, from both hooks. Distinct priorities keep each
// hook's dump, and a delete by handle, to its own filter.
const intoPodRedirectPrio = 0xFFF1

// hookPrio is where our redirect sits on a clsact hook.
func hookPrio(hook uint32) uint16 {
	if hook == egressHook {
		return intoPodRedirectPrio
	}
	return redirectPrio
}

// redirectCookie marks our mirred action (TCA_ACT_COOKIE, at most 16 bytes).
var redirectCookie = []byte("qoscni/redirect1")

var egressHook = core.BuildHandle(0xFFFF, tc.HandleMinEgress)

// redirectState is what the veth's ingress hook holds of ours.
type redirectState struct {
	handle uint32 // our key node, 0 = none
	target uint32 // the ifindex it redirects to
	// legacy are key nodes qoscni put at legacyRedirectPrio before it
	// marked its filter: a lone mirred redirect to this attachment's IFB,
	// a device named after the attachment that nobody else redirects to.
	legacy []uint32
	// legacyAlone: nothing else at legacyRedirectPrio, so the whole
	// classifier there can go.
	legacyAlone bool
	// conflict names a filter of someone else's at our priority.
	conflict string
}

func (r redirectState) any() bool { return r.handle != 0 || len(r.legacy) > 0 }

func filterPrio(f *tc.Object) uint16  { return uint16(f.Info >> 16) }
func filterProto(f *tc.Object) uint16 { return htons(uint16(f.Info)) }

// isU32Structure: the classifier's own entry (no handle) and its hash
// tables (node id 0) are dumped beside the key nodes.
func isU32Structure(f *tc.Object) bool {
	return f.Kind == "u32" && (f.Handle == 0 || f.Handle&0xFFF == 0)
}

// loneRedirect returns the target of a filter whose only action is a
// mirred egress redirect, and that action's cookie.
func loneRedirect(f *tc.Object) (target uint32, cookie []byte, ok bool) {
	if f.Kind != "u32" || f.U32 == nil || f.U32.Actions == nil || len(*f.U32.Actions) != 1 {
		return 0, nil, false
	}
	a := (*f.U32.Actions)[0]
	if a == nil || a.Kind != "mirred" || a.Mirred == nil || a.Mirred.Parms == nil || a.Mirred.Parms.Eaction != egressRedir {
		return 0, nil, false
	}
	if a.Cookie != nil {
		cookie = *a.Cookie
	}
	return a.Mirred.Parms.IfIndex, cookie, true
}

// isOurRedirect: our priority, protocol, node id and cookie.
func isOurRedirect(f *tc.Object) (uint32, bool) { return isOurRedirectAt(f, redirectPrio) }

func isOurRedirectAt(f *tc.Object, prio uint16) (uint32, bool) {
	if filterPrio(f) != prio || filterProto(f) != ethPAll || f.Handle&0xFFF != redirectNode {
		return 0, false
	}
	target, cookie, ok := loneRedirect(f)
	return target, ok && bytes.Equal(cookie, redirectCookie)
}

func isLegacyRedirect(f *tc.Object, legacyTarget func(uint32) bool) (uint32, bool) {
	if filterPrio(f) != legacyRedirectPrio || filterProto(f) != ethPAll || isU32Structure(f) {
		return 0, false
	}
	target, cookie, ok := loneRedirect(f)
	return target, ok && cookie == nil && target != 0 && legacyTarget(target)
}

// classifyRedirect sorts the ingress hook's filters into ours, our
// legacy ones (redirects to a device legacyTarget accepts) and others.
func classifyRedirect(filters []tc.Object, legacyTarget func(uint32) bool) redirectState {
	return classifyRedirectAt(filters, redirectPrio, legacyTarget)
}

// classifyRedirectAt is classifyRedirect for our redirect at prio.
func classifyRedirectAt(filters []tc.Object, prio uint16, legacyTarget func(uint32) bool) redirectState {
	var rs redirectState
	var conflict *tc.Object
	legacyOthers := false
	for i := range filters {
		f := &filters[i]
		switch filterPrio(f) {
		case prio:
			if target, ok := isOurRedirectAt(f, prio); ok {
				rs.handle, rs.target = f.Handle, target
				continue
			}
			if isU32Structure(f) && filterProto(f) == ethPAll {
				continue
			}
			// Name a filter itself rather than its classifier's entry.
			if conflict == nil || (conflict.Handle == 0 && f.Handle != 0) {
				conflict = f
			}
		case legacyRedirectPrio:
			if _, ok := isLegacyRedirect(f, legacyTarget); ok {
				rs.legacy = append(rs.legacy, f.Handle)
			} else if !(isU32Structure(f) && filterProto(f) == ethPAll) {
				legacyOthers = true
			}
		}
	}
	rs.legacyAlone = len(rs.legacy) > 0 && !legacyOthers
	if conflict != nil {
		rs.conflict = describeFilter(conflict)
	}
	return rs
}

func describeFilter(f *tc.Object) string {
	d := fmt.Sprintf("a %s filter (protocol %#04x, handle %#x", f.Kind, filterProto(f), f.Handle)
	if f.BPF != nil && f.BPF.Name != nil {
		d += fmt.Sprintf(", program %q", *f.BPF.Name)
	}
	return d + ")"
}

// OwnRedirect finds qoscni's egress redirect among the filters of a
// veth's ingress hook and returns where it sends packets. Without the
// marked filter, a lone redirect at the old shared priority to a device
// isIFB accepts (qoscni's IFBs) counts as qoscni's from before the marker.
func OwnRedirect(filters []tc.Object, isIFB func(ifindex uint32) bool) (uint32, bool) {
	for i := range filters {
		if target, ok := isOurRedirect(&filters[i]); ok {
			return target, true
		}
	}
	for i := range filters {
		if target, ok := isLegacyRedirect(&filters[i], isIFB); ok {
			return target, true
		}
	}
	return 0, false
}

func (s *Shaper) readRedirect(vethIndex, ifbIndex int) (redirectState, error) {
	return s.readRedirectOn(ingressHook, vethIndex, ifbIndex)
}

// readRedirectOn reads our redirect on one of the veth's clsact hooks.
func (s *Shaper) readRedirectOn(hook uint32, vethIndex, ifbIndex int) (redirectState, error) {
	filters, err := s.tc.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(vethIndex), Parent: hook})
	if err != nil {
		return redirectState{}, fmt.Errorf("dump filters of ifindex %d: %w", vethIndex, err)
	}
	return classifyRedirectAt(filters, hookPrio(hook), func(i uint32) bool { return ifbIndex != 0 && i == uint32(ifbIndex) }), nil
}

func redirectFilter(vethIndex, ifbIndex int, handle uint32) *tc.Object {
	return redirectFilterOn(ingressHook, vethIndex, ifbIndex, handle)
}

// redirectFilterOn is our marked match-all redirect to ifbIndex on one
// of the veth's clsact hooks: the ingress hook takes traffic out of the
// pod, the egress hook traffic into it.
func redirectFilterOn(hook uint32, vethIndex, ifbIndex int, handle uint32) *tc.Object {
	cookie := append([]byte(nil), redirectCookie...)
	actions := []*tc.Action{{
		Kind:   "mirred",
		Cookie: &cookie,
		Mirred: &tc.Mirred{Parms: &tc.MirredParam{
			Action:  tcActStolen,
			Eaction: egressRedir,
			IfIndex: uint32(ifbIndex),
		}},
	}}
	return &tc.Object{Msg: msg(vethIndex, handle, hook, filterInfo(hookPrio(hook))), Attribute: tc.Attribute{Kind: "u32", U32: &tc.U32{
		Sel: &tc.U32Sel{
			Flags: u32Terminal,
			NKeys: 1,
			Keys:  []tc.U32Key{{Mask: 0, Val: 0, Off: 0}},
		},
		Actions: &actions,
	}}}
}

// addRedirect installs the match-all filter that hands every packet from
// the pod to the IFB. Create-exclusive: it never overwrites a filter.
func (s *Shaper) addRedirect(vethIndex, ifbIndex int) error {
	if err := s.tc.Filter().Add(redirectFilter(vethIndex, ifbIndex, redirectNode)); err != nil {
		return fmt.Errorf("add redirect filter on ifindex %d: %w", vethIndex, err)
	}
	return nil
}

// retargetRedirect points our existing filter at another IFB in one
// change (u32 swaps the key node atomically): no packet passes unshaped.
func (s *Shaper) retargetRedirect(vethIndex, ifbIndex int, handle uint32) error {
	if err := s.tc.Filter().Replace(redirectFilter(vethIndex, ifbIndex, handle)); err != nil {
		return fmt.Errorf("retarget redirect filter on ifindex %d: %w", vethIndex, err)
	}
	return nil
}

// deleteFilters removes key nodes of one u32 classifier: the whole
// classifier when it holds nothing but them (an empty one would stay
// behind and keep the clsact qdisc), else each by its handle.
func (s *Shaper) deleteFilters(vethIndex int, prio uint16, handles []uint32, whole bool) error {
	return s.deleteFiltersOn(ingressHook, vethIndex, prio, handles, whole)
}

func (s *Shaper) deleteFiltersOn(hook uint32, vethIndex int, prio uint16, handles []uint32, whole bool) error {
	if whole {
		handles = []uint32{0}
	}
	for _, h := range handles {
		err := s.tc.Filter().Delete(&tc.Object{Msg: msg(vethIndex, h, hook, filterInfo(prio)), Attribute: tc.Attribute{Kind: "u32"}})
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete redirect filter %#x at priority %d on ifindex %d: %w", h, prio, vethIndex, err)
		}
	}
	return nil
}

// removeLegacy deletes the redirects qoscni made before its marker.
func (s *Shaper) removeLegacy(vethIndex int, rs redirectState) error {
	if len(rs.legacy) == 0 {
		return nil
	}
	return s.deleteFilters(vethIndex, legacyRedirectPrio, rs.legacy, rs.legacyAlone)
}

// removeRedirect deletes our redirect (and any legacy one), then the
// clsact qdisc if nothing else is attached to it.
func (s *Shaper) removeRedirect(vethIndex int, rs redirectState) error {
	if rs.handle != 0 {
		if err := s.deleteFilters(vethIndex, redirectPrio, []uint32{rs.handle}, rs.conflict == ""); err != nil {
			return err
		}
	}
	if err := s.removeLegacy(vethIndex, rs); err != nil {
		return err
	}
	return s.deleteClsactIfUnused(vethIndex)
}

// deleteClsactIfUnused deletes the clsact qdisc when neither hook holds a
// filter: it may be the main plugin's, but then nothing of theirs hangs
// on it any more.
func (s *Shaper) deleteClsactIfUnused(vethIndex int) error {
	for _, hook := range []uint32{ingressHook, egressHook} {
		f, err := s.tc.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(vethIndex), Parent: hook})
		if err != nil {
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) {
				return nil // no clsact any more
			}
			return fmt.Errorf("dump filters of ifindex %d: %w", vethIndex, err)
		}
		if len(f) > 0 {
			return nil
		}
	}
	err := s.tc.Qdisc().Delete(&tc.Object{Msg: msg(vethIndex, clsactHandle, tc.HandleIngress, 0), Attribute: tc.Attribute{Kind: "clsact"}})
	if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete clsact of ifindex %d: %w", vethIndex, err)
	}
	return nil
}

func filterInfo(prio uint16) uint32 {
	return uint32(prio)<<16 | uint32(htons(ethPAll))
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
