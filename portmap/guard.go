package portmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/tcdump"
)

// The localnet guard is the second guard of route_localnet, beside the
// martian chain: a cls_bpf filter in direct-action mode on the clsact
// ingress hook of the interface that has route_localnet=1, dropping IPv4
// packets with a 127/8 source or destination. nftables cannot remove it
// (`nft flush ruleset`, a reload, a deleted table), so the hole that the
// sysctl opens (CVE-2020-8558) stays closed while the martian chain is
// gone. The kernel has no gact, so the program returns the verdict itself
// (classic BPF: cls_bpf accepts it through TCA_BPF_OPS).
//
// One legitimate packet does reach the hook with a 127/8 destination: on
// a bridge with br_netfilter, the reply of a localhost connection to a
// hostPort is de-NATed to 127.0.0.1 at the bridge port's prerouting,
// before the bridge device's own ingress hook. The localnet chain of our
// table marks exactly those (localnetMark), and the guard lets marked
// packets pass. Without our table there is neither the mark nor NAT to
// make such a reply, so every 127/8 destination is dropped.
//
// Ownership: cls_bpf keeps no name for a classic program, so the program
// carries the marker itself (its first instruction loads guardMagic into
// X, which nothing reads), next to our priority and handle. A filter at
// our priority without the marker is someone else's and is never touched.
const (
	// guardPriority is early on the hook, yet after priority 1, which
	// many tc users take (Cilium; the shaping redirect to an IFB).
	guardPriority = 0x71
	guardHandle   = 0x71c
	guardMagic    = 0x716f7363 // "qosc"
	ethPIP        = 0x0800
	// TC_ACT_UNSPEC (-1): let the next filter and the stack decide.
	tcActUnspec = 0xffffffff
	// TC_ACT_SHOT.
	tcActShot = 2
	// The hook's data starts at the MAC header: Ethernet (14 bytes), then
	// the IPv4 header with saddr at +12 and daddr at +16.
	ethHeaderLen = 14
	// localnetMark is the skb mark bit of a reply to a localhost
	// connection that nftables translated. It avoids the bits others are
	// known to use: kube-proxy 0x4000 and 0x8000, Cilium 0x0f00 and the
	// upper half, Calico the upper half, Istio 0x539.
	localnetMark = 0x1000
)

// Hook handles of a clsact qdisc (an ingress qdisc takes the same
// ingress parent).
var (
	hookQdisc   = core.BuildHandle(0xFFFF, 0)
	hookIngress = core.BuildHandle(0xFFFF, tc.HandleMinIngress)
	hookEgress  = core.BuildHandle(0xFFFF, tc.HandleMinEgress)
)

// guardProgram drops IPv4 from 127/8, and to 127/8 unless marked. Short
// frames and other protocols go on unchanged: a classic program that
// loads past the end returns 0, which would be TC_ACT_OK and skip the
// hook's other filters.
func guardProgram() []bpf.Instruction {
	return guardProgramWith(bpf.LoadExtension{Num: bpf.ExtMark})
}

// guardProgramWith takes the instruction that loads the mark, which the
// tests replace (x/net/bpf's VM has no skb).
func guardProgramWith(loadMark bpf.Instruction) []bpf.Instruction {
	return []bpf.Instruction{
		bpf.LoadConstant{Dst: bpf.RegX, Val: guardMagic},
		bpf.LoadExtension{Num: bpf.ExtLen},
		bpf.JumpIf{Cond: bpf.JumpLessThan, Val: ethHeaderLen + 20, SkipTrue: 9}, // to pass
		bpf.LoadAbsolute{Off: 12, Size: 2},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: ethPIP, SkipTrue: 7}, // to pass
		bpf.LoadAbsolute{Off: ethHeaderLen + 12, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 127, SkipTrue: 4}, // to drop
		bpf.LoadAbsolute{Off: ethHeaderLen + 16, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 127, SkipTrue: 3}, // to pass
		loadMark,
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: localnetMark, SkipTrue: 1}, // to pass
		bpf.RetConstant{Val: tcActShot},                                   // drop
		bpf.RetConstant{Val: tcActUnspec},                                 // pass
	}
}

// guardOps is the program as struct sock_filter[] in host byte order,
// what TCA_BPF_OPS carries and what a dump gives back.
func guardOps() []byte {
	raw, err := bpf.Assemble(guardProgram())
	if err != nil {
		panic(fmt.Sprintf("assemble the localnet guard: %v", err))
	}
	return sockFilters(raw)
}

func sockFilters(raw []bpf.RawInstruction) []byte {
	out := make([]byte, 0, 8*len(raw))
	for _, r := range raw {
		out = binary.NativeEndian.AppendUint16(out, r.Op)
		out = append(out, r.Jt, r.Jf)
		out = binary.NativeEndian.AppendUint32(out, r.K)
	}
	return out
}

// guardMarker is the first instruction of every version of the program.
func guardMarker() []byte {
	raw, _ := bpf.Assemble([]bpf.Instruction{bpf.LoadConstant{Dst: bpf.RegX, Val: guardMagic}})
	return sockFilters(raw)
}

func guardInfo() uint32 { return uint32(guardPriority)<<16 | uint32(htons(ethPIP)) }

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// guardState is what an interface's ingress hook holds.
type guardState struct {
	hook    bool   // a clsact (or ingress) qdisc is there
	ours    bool   // our filter is at our priority
	current bool   // ...with this version's program
	foreign string // what else holds our priority, "" = nothing
}

func (s guardState) ok() bool { return s.ours && s.current }

// tcConn is go-tc's socket in a namespace, and the namespace for the
// qdisc dump, which is tcdump's (go-tc's fails on any qdisc of the node
// it cannot decode).
type tcConn struct {
	*tc.Tc
	nsFd int
}

func openTC(nsFd int) (*tcConn, error) {
	cfg := &tc.Config{}
	if nsFd >= 0 {
		cfg.NetNS = nsFd
	}
	c, err := tc.Open(cfg)
	if err != nil {
		return nil, fmt.Errorf("open tc netlink: %w", err)
	}
	return &tcConn{Tc: c, nsFd: nsFd}, nil
}

// readGuard reads the interface's hook qdisc alone (not the node's
// every qdisc: ADD reads it twice, and a dump grows with the pods).
func readGuard(c *tcConn, ifindex uint32) (guardState, error) {
	hook, err := tcdump.HookAt(c.nsFd, ifindex)
	if err != nil {
		return guardState{}, err
	}
	return readGuardFilters(c, ifindex, hook != nil)
}

// hasHook reports whether the interface has a qdisc with an ingress hook.
func hasHook(qdiscs []tcdump.Qdisc, ifindex uint32) bool {
	for _, q := range qdiscs {
		if q.Ifindex == ifindex && q.Parent == tc.HandleIngress && (q.Kind == "clsact" || q.Kind == "ingress") {
			return true
		}
	}
	return false
}

func readGuardFilters(c *tcConn, ifindex uint32, hook bool) (guardState, error) {
	st := guardState{hook: hook}
	if !hook {
		return st, nil
	}
	filters, err := c.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: ifindex, Parent: hookIngress})
	if err != nil {
		return st, fmt.Errorf("dump ingress filters of ifindex %d: %w", ifindex, err)
	}
	want, marker := guardOps(), guardMarker()
	for _, f := range filters {
		if f.Info>>16 != guardPriority {
			continue
		}
		switch {
		case f.Kind == "bpf" && f.Handle == 0 && f.BPF == nil:
			// The priority's own entry, listed before its filters.
		case f.Kind == "bpf" && f.Handle == guardHandle && f.BPF != nil && f.BPF.Ops != nil && bytes.HasPrefix(*f.BPF.Ops, marker):
			st.ours = true
			st.current = bytes.Equal(*f.BPF.Ops, want) && f.BPF.Flags != nil && *f.BPF.Flags&tc.BpfActDirect != 0
		case st.foreign == "":
			st.foreign = fmt.Sprintf("%s filter (handle %#x)", f.Kind, f.Handle)
		}
	}
	return st, nil
}

func guardObject(ifindex uint32) *tc.Object {
	ops := guardOps()
	n := uint16(len(ops) / 8)
	flags := uint32(tc.BpfActDirect)
	return &tc.Object{
		Msg:       tc.Msg{Family: unix.AF_UNSPEC, Ifindex: ifindex, Handle: guardHandle, Parent: hookIngress, Info: guardInfo()},
		Attribute: tc.Attribute{Kind: "bpf", BPF: &tc.Bpf{Ops: &ops, OpsLen: &n, Flags: &flags}},
	}
}

// errGuardForeign reports a filter of someone else's at our priority.
func errGuardForeign(iface, what string) error {
	return types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("tc priority %d on the ingress hook of %s is taken by a %s that is not qoscni's; the localnet guard for route_localnet needs it", guardPriority, iface, what),
		"remove that filter or do not map IPv4 hostPorts through "+iface)
}

// installGuard makes the hook hold the current guard, creating the clsact
// qdisc only when the interface has none. It reports whether it changed
// anything and whether it created the qdisc.
func installGuard(c *tcConn, iface string, ifindex uint32) (changed, createdHook bool, err error) {
	st, err := readGuard(c, ifindex)
	if err != nil || st.ok() {
		return false, false, err
	}
	if st.foreign != "" {
		return false, false, errGuardForeign(iface, st.foreign)
	}
	if !st.hook {
		q := &tc.Object{Msg: tc.Msg{Family: unix.AF_UNSPEC, Ifindex: ifindex, Handle: hookQdisc, Parent: tc.HandleIngress},
			Attribute: tc.Attribute{Kind: "clsact"}}
		switch err := c.Qdisc().Add(q); {
		case err == nil:
			createdHook = true
		case !errors.Is(err, unix.EEXIST):
			return false, false, fmt.Errorf("add clsact to %s for the localnet guard: %w", iface, err)
		}
	}
	if st.ours {
		err = c.Filter().Replace(guardObject(ifindex))
	} else {
		err = c.Filter().Add(guardObject(ifindex))
	}
	if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EINVAL) {
		// Another ADD put it there since, or someone else took the
		// priority: look again to tell which.
		st, rerr := readGuard(c, ifindex)
		if rerr == nil && st.ok() {
			return true, createdHook, nil
		}
		if rerr == nil && st.foreign != "" {
			return false, createdHook, errGuardForeign(iface, st.foreign)
		}
	}
	if err != nil {
		return false, createdHook, fmt.Errorf("add the localnet guard to the ingress hook of %s: %w", iface, err)
	}
	return true, createdHook, nil
}

// removeGuard deletes our filter only, and the clsact qdisc when dropHook
// says qoscni created it and no filter is left on either of its hooks.
func removeGuard(c *tcConn, iface string, ifindex uint32, dropHook bool) (removed bool, err error) {
	st, err := readGuard(c, ifindex)
	if err != nil {
		return false, err
	}
	if st.ours {
		err := c.Filter().Delete(&tc.Object{Msg: tc.Msg{Family: unix.AF_UNSPEC, Ifindex: ifindex, Handle: guardHandle, Parent: hookIngress, Info: guardInfo()},
			Attribute: tc.Attribute{Kind: "bpf"}})
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return false, fmt.Errorf("remove the localnet guard from %s: %w", iface, err)
		}
		removed = true
	}
	if !dropHook || !st.hook {
		return removed, nil
	}
	for _, hook := range []uint32{hookIngress, hookEgress} {
		fs, err := c.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: ifindex, Parent: hook})
		if err != nil || len(fs) > 0 {
			return removed, nil // someone's filters (or no answer): the qdisc stays
		}
	}
	err = c.Qdisc().Delete(&tc.Object{Msg: tc.Msg{Family: unix.AF_UNSPEC, Ifindex: ifindex, Handle: hookQdisc, Parent: tc.HandleIngress},
		Attribute: tc.Attribute{Kind: "clsact"}})
	if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return removed, fmt.Errorf("remove the clsact qdisc qoscni added to %s: %w", iface, err)
	}
	return removed, nil
}
