package controls

import (
	"net"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
)

// Chains. Both run after conntrack (-200, which ct count needs) and after
// destination NAT (-100), so a packet to a Service is seen with the pod's
// address. Prerouting sees all a pod sends and all that reaches a pod
// from outside the node or another pod; output sees the node's own
// traffic to pods.
const (
	chainPrerouting = "controls-prerouting"
	chainOutput     = "controls-output"
	chainDSCPPrefix = "dscp-"
	priority        = nftables.ChainPriority(0)
)

// ruleTag prefixes the comment of every rule of ours; the base check
// compares them, as the hostPort chains do. Its version changes with the
// rules, so that a node upgraded from a release with other rules has them
// rewritten at its next ADD or repair (v2: the packet rate's drop sets).
const ruleTag = "qoscni-controls/v2: "

// Kind is one control of one direction.
type Kind int

// The controls with a per-pod counter.
const (
	EgressPackets Kind = iota
	IngressPackets
	EgressConnections
	IngressConnections
	numCounted
)

func (k Kind) String() string {
	return [...]string{"egress-packet-rate", "ingress-packet-rate", "egress-connections", "ingress-connections"}[k]
}

// Direction is "egress" or "ingress"; Control "packet-rate" or "connections".
func (k Kind) Direction() string {
	if k == EgressPackets || k == EgressConnections {
		return "egress"
	}
	return "ingress"
}

// Control names the control without its direction.
func (k Kind) Control() string {
	if k == EgressPackets || k == IngressPackets {
		return "packet-rate"
	}
	return "connections"
}

func (k Kind) egress() bool      { return k.Direction() == "egress" }
func (k Kind) connections() bool { return k.Control() == "connections" }

func (k Kind) setName(v6 bool) string {
	s := "pkt-"
	if k.connections() {
		s = "conn-"
	}
	s += k.Direction()
	if v6 {
		return s + "6"
	}
	return s + "4"
}

// dropSetName is the set of a packet rate's drop counters: its elements
// carry only a counter, and the rule looks them up after the rate's own
// element matched, so they count exactly the packets dropped.
func (k Kind) dropSetName(v6 bool) string {
	if v6 {
		return "pkt-drop-" + k.Direction() + "6"
	}
	return "pkt-drop-" + k.Direction() + "4"
}

func dscpSet(v6 bool) string {
	if v6 {
		return "dscp6"
	}
	return "dscp4"
}

func dscpChain(d uint8) string { return chainDSCPPrefix + itoa(int(d)) }

func itoa(v int) string {
	if v < 10 {
		return string(rune('0' + v))
	}
	return itoa(v/10) + string(rune('0'+v%10))
}

type layout struct {
	table              *nftables.Table
	prerouting, output *nftables.Chain
	sets               []*nftables.Set
}

func newLayout() *layout {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: podnet.TableName}
	l := &layout{
		table: t,
		prerouting: &nftables.Chain{Name: chainPrerouting, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: ptr(priority)},
		output: &nftables.Chain{Name: chainOutput, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookOutput, Priority: ptr(priority)},
	}
	for _, v6 := range []bool{false, true} {
		key := nftables.TypeIPAddr
		if v6 {
			key = nftables.TypeIP6Addr
		}
		for k := Kind(0); k < numCounted; k++ {
			l.sets = append(l.sets, &nftables.Set{Table: t, Name: k.setName(v6), KeyType: key})
			if !k.connections() {
				l.sets = append(l.sets, &nftables.Set{Table: t, Name: k.dropSetName(v6), KeyType: key})
			}
		}
		l.sets = append(l.sets, &nftables.Set{Table: t, Name: dscpSet(v6), KeyType: key, IsMap: true, DataType: nftables.TypeVerdict})
	}
	return l
}

func (l *layout) set(name string) *nftables.Set {
	for _, s := range l.sets {
		if s.Name == name {
			return s
		}
	}
	panic("controls: no set " + name)
}

func ptr[T any](v T) *T { return &v }

// addrField is where a pod address sits in the network header: the
// source for what the pod sends, the destination for what it receives.
func addrField(v6, source bool) (offset, length uint32) {
	switch {
	case v6 && source:
		return 8, 16
	case v6:
		return 24, 16
	case source:
		return 12, 4
	}
	return 16, 4
}

func nfproto(v6 bool) []expr.Any { return nfraw.MatchFamily(v6) }

func loadAddr(v6, source bool) expr.Any {
	off, n := addrField(v6, source)
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
}

// ctStateNew is ct state new (the bit of IP_CT_NEW in the state key).
const ctStateNew = 1 << 3

type rule struct {
	chain   *nftables.Chain
	comment string
	exprs   []expr.Any
}

// rules are the fixed rules, in chain order: drops by packet rate first
// (a flood costs least there), then new connections over their bound.
// A packet rate's element counts every packet of its pod's direction and
// then matches only when the packet is over the rate; only then is the
// drop set's element looked up, counting the drop. A pod without a packet
// rate costs one lookup that misses.
func (l *layout) rules() []rule {
	var out []rule
	for _, chain := range []*nftables.Chain{l.prerouting, l.output} {
		for _, v6 := range []bool{false, true} {
			for _, k := range []Kind{EgressPackets, IngressPackets} {
				if chain == l.output && k.egress() {
					continue // a pod's own packets never pass output
				}
				s, d := l.set(k.setName(v6)), l.set(k.dropSetName(v6))
				ex := append(nfproto(v6), loadAddr(v6, k.egress()),
					&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
					&expr.Lookup{SourceRegister: 1, SetName: d.Name, SetID: d.ID},
					&expr.Verdict{Kind: expr.VerdictDrop})
				out = append(out, rule{chain, k.setName(v6) + " drop", ex})
			}
		}
		for _, v6 := range []bool{false, true} {
			for _, k := range []Kind{EgressConnections, IngressConnections} {
				if chain == l.output && k.egress() {
					continue
				}
				s := l.set(k.setName(v6))
				// TCP connections, as Calico counts them: UDP flows and
				// ICMP echoes are conntrack entries too, but they live on
				// for 30 s to 3 min after their last packet and would
				// make the bound unpredictable (the packet rate is the
				// control for those).
				ex := append(nfproto(v6),
					&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
					&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
					&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{ctStateNew, 0, 0, 0}, Xor: []byte{0, 0, 0, 0}},
					&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
					loadAddr(v6, k.egress()),
					&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
					&expr.Reject{Type: unix.NFT_REJECT_TCP_RST})
				out = append(out, rule{chain, k.setName(v6) + " tcp reset", ex})
			}
		}
	}
	for _, v6 := range []bool{false, true} {
		s := l.set(dscpSet(v6))
		ex := append(nfproto(v6), loadAddr(v6, true),
			&expr.Lookup{SourceRegister: 1, DestRegister: 0, IsDestRegSet: true, SetName: s.Name, SetID: s.ID})
		out = append(out, rule{l.prerouting, s.Name + " vmap", ex})
	}
	return out
}

// dscpRules rewrite the DSCP bits of the IPv4 TOS or IPv6 traffic class,
// keeping ECN. Each writes the first 16-bit word of the header: a one
// byte write at the odd offset of the TOS would leave the IPv4 header
// checksum wrong, as the kernel updates it 16 bits at a time.
func dscpRules(d uint8) [][]expr.Any {
	v4 := append(nfproto(false),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 0, Len: 2},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: []byte{0xff, 0x03}, Xor: []byte{0, d << 2}},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseNetworkHeader,
			Offset: 0, Len: 2, CsumType: expr.CsumTypeInet, CsumOffset: 10})
	v6 := append(nfproto(true),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 0, Len: 2},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: []byte{0xf0, 0x3f}, Xor: []byte{d >> 2, (d & 3) << 6}},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 0, Len: 2})
	return [][]expr.Any{v4, v6}
}

func comment(s string) []byte { return userdata.AppendString(nil, userdata.TypeComment, ruleTag+s) }

func addrKey(ip net.IP) (key []byte, v6 bool) {
	if v4 := ip.To4(); v4 != nil {
		return append([]byte(nil), v4...), false
	}
	return append([]byte(nil), ip.To16()...), true
}

// Elements names the elements c gives the pod's addresses, as
// `nft list table inet qoscni` shows them: "set key" (with "-> chain" for
// a DSCP), for people looking for them.
func Elements(ips []net.IP, c *state.Controls) []string {
	var out []string
	for _, w := range desired(Owner{}, ips, c) {
		ip := net.IP(w.el.Key)
		s := w.set + " " + ip.String()
		if w.el.Jump != "" {
			s += " -> " + w.el.Jump
		}
		out = append(out, s)
	}
	return out
}
