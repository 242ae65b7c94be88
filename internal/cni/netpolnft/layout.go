// Package netpolnft is where Kubernetes NetworkPolicy meets packets in
// standalone mode: sets, maps and a fixed set of chains in qoscni's
// nftables table. The node agent computes the elements
// (internal/agent/netpol) and writes them in one transaction per change
// (Manager.Apply); the plugin's ADD puts a new pod's addresses in the
// pending set before the pod has them (Manager.Pend), so a pod is closed
// both ways until the agent has written its policy, and its DEL takes
// them out again (Cleaner).
//
// A new connection (conntrack state new) through the node's forward hook
// meets, in order: pending addresses, closed both ways; the source's
// egress check when the source is egress-isolated; the destination's
// ingress check when it is ingress-isolated. A check passes when the set
// of allowances by peer identity or the one by peer address range holds
// (pod address, peer, protocol, destination port). What a pod sends to
// the node itself (input hook) meets the pending and egress checks too;
// what the node sends to its pods is always allowed, as the API says
// (kubelet probes). Established and related packets pass first, so a
// connection allowed when it began keeps flowing.
//
// The rules a packet meets do not depend on the number of pods or
// policies: that is all in the elements.
package netpolnft

import (
	"encoding/binary"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/nfraw"
)

// Chains.
const (
	chainForward = "np-forward"
	chainInput   = "np-input"
	// After conntrack (-200) and destination NAT (-100): a packet to a
	// Service is seen with its endpoint's address.
	priority = nftables.ChainPriority(0)
)

// ruleTag prefixes the comment of every rule of ours; EnsureBase compares
// them. Its version changes with the rules or sets, so that a node
// upgraded from a release with others has them rewritten (v2: the exact
// allowance sets beside the interval ones).
const ruleTag = "qoscni-netpol/v2: "

// Set kinds; each exists per family (suffix 4 or 6).
const (
	setPending = "np-pending" // addresses not yet programmed: closed
	// Verdict maps: a pod's address (any node's) -> goto its identity's
	// chain, which checks the identity's allowances.
	setPeerIn  = "np-peer-in"
	setPeerOut = "np-peer-out"
	setIngIso  = "np-iiso" // ingress-isolated pod addresses
	setEgrIso  = "np-eiso" // egress-isolated pod addresses
	setIngID   = "np-iid"  // pod . peer identity . proto . port range (intervals)
	setIngBlk  = "np-iblk" // pod . peer address . proto . port
	setEgrID   = "np-eid"
	setEgrBlk  = "np-eblk"
	// The allowances by identity of the usual shapes, in hash sets: the
	// kernel removes an element of an interval set (pipapo) in time that
	// grows with the set, a hash set's in constant time, and a policy
	// change removes many at once.
	setIngIDAny   = "np-iida" // pod . peer identity: every protocol and port
	setIngIDProto = "np-iidp" // pod . peer identity . proto: every port
	setIngIDPort  = "np-iidx" // pod . peer identity . proto . port
	setEgrIDAny   = "np-eida"
	setEgrIDProto = "np-eidp"
	setEgrIDPort  = "np-eidx"
)

// allowanceKinds are the sets Apply writes from a State.
var allowanceKinds = []string{setPeerIn, setPeerOut, setIngIso, setEgrIso,
	setIngIDAny, setIngIDProto, setIngIDPort, setIngID, setEgrIDAny, setEgrIDProto, setEgrIDPort, setEgrID, setIngBlk, setEgrBlk}

func name(kind string, v6 bool) string {
	if v6 {
		return kind + "6"
	}
	return kind + "4"
}

func egressChain(v6 bool) string  { return name("np-egress", v6) }
func ingressChain(v6 bool) string { return name("np-ingress", v6) }

// regs are the 32-bit registers (NFT_REG32_00 is 8): a concatenated key
// is consecutive registers, one field each, padded to 4 bytes.
const reg0 = 8

type layout struct {
	table          *nftables.Table
	forward, input *nftables.Chain
	chains         []*nftables.Chain // the regular ones
	sets           []*nftables.Set
}

func addrType(v6 bool) nftables.SetDatatype {
	if v6 {
		return nftables.TypeIP6Addr
	}
	return nftables.TypeIPAddr
}

func newLayout() *layout {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: podnet.TableName}
	l := &layout{
		table: t,
		forward: &nftables.Chain{Name: chainForward, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: ptr(priority)},
		input: &nftables.Chain{Name: chainInput, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookInput, Priority: ptr(priority)},
	}
	for _, v6 := range []bool{false, true} {
		a := addrType(v6)
		l.chains = append(l.chains, &nftables.Chain{Name: egressChain(v6), Table: t}, &nftables.Chain{Name: ingressChain(v6), Table: t})
		l.sets = append(l.sets,
			&nftables.Set{Table: t, Name: name(setPending, v6), KeyType: a},
			&nftables.Set{Table: t, Name: name(setPeerIn, v6), KeyType: a, IsMap: true, DataType: nftables.TypeVerdict},
			&nftables.Set{Table: t, Name: name(setPeerOut, v6), KeyType: a, IsMap: true, DataType: nftables.TypeVerdict},
			&nftables.Set{Table: t, Name: name(setIngIso, v6), KeyType: a},
			&nftables.Set{Table: t, Name: name(setEgrIso, v6), KeyType: a})
		id := nftables.MustConcatSetType(a, nftables.TypeMark, nftables.TypeInetProto, nftables.TypeInetService)
		blk := nftables.MustConcatSetType(a, a, nftables.TypeInetProto, nftables.TypeInetService)
		for _, s := range []struct {
			kind string
			key  nftables.SetDatatype
		}{{setIngID, id}, {setEgrID, id}, {setIngBlk, blk}, {setEgrBlk, blk}} {
			l.sets = append(l.sets, &nftables.Set{Table: t, Name: name(s.kind, v6), KeyType: s.key, Concatenation: true, Interval: true})
		}
		for _, s := range []struct {
			kind string
			key  nftables.SetDatatype
		}{
			{setIngIDAny, nftables.MustConcatSetType(a, nftables.TypeMark)},
			{setEgrIDAny, nftables.MustConcatSetType(a, nftables.TypeMark)},
			{setIngIDProto, nftables.MustConcatSetType(a, nftables.TypeMark, nftables.TypeInetProto)},
			{setEgrIDProto, nftables.MustConcatSetType(a, nftables.TypeMark, nftables.TypeInetProto)},
			{setIngIDPort, id}, {setEgrIDPort, id},
		} {
			l.sets = append(l.sets, &nftables.Set{Table: t, Name: name(s.kind, v6), KeyType: s.key, Concatenation: true})
		}
	}
	return l
}

func (l *layout) set(name string) *nftables.Set {
	for _, s := range l.sets {
		if s.Name == name {
			return s
		}
	}
	panic("netpolnft: no set " + name)
}

func ptr[T any](v T) *T { return &v }

type rule struct {
	chain   string
	comment string
	exprs   []expr.Any
}

func nfproto(v6 bool) []expr.Any { return nfraw.MatchFamily(v6) }

// addrLen is an address's length in bytes.
func addrLen(v6 bool) uint32 {
	if v6 {
		return 16
	}
	return 4
}

// loadAddr loads the source or destination address into reg.
func loadAddr(v6, source bool, reg uint32) expr.Any {
	off := uint32(16)
	switch {
	case v6 && source:
		off = 8
	case v6:
		off = 24
	case source:
		off = 12
	}
	return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: addrLen(v6)}
}

// ct state bits (NF_CT_STATE_BIT): established 1<<1, related 1<<2.
const ctEstablishedRelated = 1<<1 | 1<<2

func established() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, ctEstablishedRelated), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

// neighbourDiscovery accepts ICMPv6 router and neighbour solicitations
// and advertisements and redirects (types 133 to 137): a pod that is
// pending or egress-isolated must still find its gateway.
func neighbourDiscovery() []expr.Any {
	return append(nfproto(true),
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{137}},
		&expr.Verdict{Kind: expr.VerdictAccept})
}

// inSet: the packet's source (or destination) address is in set s, then
// verdict v.
func inSet(v6, source bool, s string, v *expr.Verdict) []expr.Any {
	return append(nfproto(v6), loadAddr(v6, source, 1),
		&expr.Lookup{SourceRegister: 1, SetName: s}, v)
}

// identChain is the chain of identity id for ingress (the peer is the
// source) or egress. A packet comes here by goto from the ingress (or
// egress) chain when its peer has that identity: a return allows it (back
// to the forward or input chain), the end drops it.
func identChain(id uint32, egress bool) string {
	if egress {
		return fmt.Sprintf("np-out-%d", id)
	}
	return fmt.Sprintf("np-in-%d", id)
}

// identRules are the rules of identity id's chain: the node's pod address
// (the destination for ingress), the identity as a constant, and as the
// allowance's set needs, the protocol and the destination port, looked up
// in the allowances by identity: every protocol and port, every port of a
// protocol, one port, then ranges. (The identity is a constant of its own
// chain rather than the value of a map: nft cannot show a rule whose key
// takes a map's value, and `nft list ruleset` would abort on every node.)
func identRules(id uint32, egress bool) []rule {
	c := identChain(id, egress)
	var out []rule
	for _, v6 := range []bool{false, true} {
		n := addrLen(v6) / 4
		key := []expr.Any{
			loadAddr(v6, egress, reg0),
			&expr.Immediate{Register: reg0 + n, Data: identBytes(id)},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg0 + n + 1},
			&expr.Payload{DestRegister: reg0 + n + 2, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		}
		for _, s := range []struct {
			in, out string
			fields  int
			comment string
		}{
			{setIngIDAny, setEgrIDAny, 2, "any"}, {setIngIDProto, setEgrIDProto, 3, "protocol"},
			{setIngIDPort, setEgrIDPort, 4, "port"}, {setIngID, setEgrID, 4, "by identity"},
		} {
			set := name(s.in, v6)
			if egress {
				set = name(s.out, v6)
			}
			ex := append(nfproto(v6), key[:s.fields]...)
			ex = append(ex, &expr.Lookup{SourceRegister: reg0, SetName: set}, &expr.Verdict{Kind: expr.VerdictReturn})
			out = append(out, rule{c, s.comment + name("", v6), ex})
		}
	}
	return append(out, rule{c, "deny", []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}}})
}

// byPeerIdentity sends the packet to its peer's identity chain (a peer
// that is no known pod goes on to the next rule).
func byPeerIdentity(v6, egress bool) []expr.Any {
	m := name(setPeerIn, v6)
	if egress {
		m = name(setPeerOut, v6)
	}
	return append(nfproto(v6), loadAddr(v6, !egress, 1),
		&expr.Lookup{SourceRegister: 1, SetName: m, DestRegister: 0, IsDestRegSet: true})
}

// allowedByBlock: the pod's address, the peer's address, protocol and
// destination port in set s: return when there.
func allowedByBlock(v6, egress bool, s string) []expr.Any {
	n := addrLen(v6) / 4
	return append(nfproto(v6),
		loadAddr(v6, egress, reg0),
		loadAddr(v6, !egress, reg0+n),
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg0 + 2*n},
		&expr.Payload{DestRegister: reg0 + 2*n + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: reg0, SetName: s},
		&expr.Verdict{Kind: expr.VerdictReturn})
}

// rules are the fixed rules, in chain order.
func (l *layout) rules() []rule {
	drop := &expr.Verdict{Kind: expr.VerdictDrop}
	out := []rule{{chainForward, "established", established()}}
	for _, v6 := range []bool{false, true} {
		f := name("", v6)
		out = append(out,
			rule{chainForward, "pending source" + f, inSet(v6, true, name(setPending, v6), drop)},
			rule{chainForward, "pending destination" + f, inSet(v6, false, name(setPending, v6), drop)},
			rule{chainForward, "egress" + f, inSet(v6, true, name(setEgrIso, v6), &expr.Verdict{Kind: expr.VerdictJump, Chain: egressChain(v6)})},
			rule{chainForward, "ingress" + f, inSet(v6, false, name(setIngIso, v6), &expr.Verdict{Kind: expr.VerdictJump, Chain: ingressChain(v6)})})
	}
	out = append(out, rule{chainInput, "established", established()}, rule{chainInput, "neighbour discovery", neighbourDiscovery()})
	for _, v6 := range []bool{false, true} {
		f := name("", v6)
		out = append(out,
			rule{chainInput, "pending source" + f, inSet(v6, true, name(setPending, v6), drop)},
			rule{chainInput, "egress" + f, inSet(v6, true, name(setEgrIso, v6), &expr.Verdict{Kind: expr.VerdictJump, Chain: egressChain(v6)})})
	}
	for _, v6 := range []bool{false, true} {
		out = append(out,
			rule{egressChain(v6), "by address", allowedByBlock(v6, true, name(setEgrBlk, v6))},
			rule{egressChain(v6), "by identity", byPeerIdentity(v6, true)},
			rule{egressChain(v6), "deny", []expr.Any{&expr.Counter{}, drop}},
			rule{ingressChain(v6), "by address", allowedByBlock(v6, false, name(setIngBlk, v6))},
			rule{ingressChain(v6), "by identity", byPeerIdentity(v6, false)},
			rule{ingressChain(v6), "deny", []expr.Any{&expr.Counter{}, drop}})
	}
	return out
}

func comment(s string) []byte { return userdata.AppendString(nil, userdata.TypeComment, ruleTag+s) }

// wantRules are the rule comments per chain, in order.
func (l *layout) wantRules() map[string][]string {
	want := map[string][]string{}
	for _, r := range l.rules() {
		want[r.chain] = append(want[r.chain], ruleTag+r.comment)
	}
	return want
}
