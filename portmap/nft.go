package portmap

import (
	"net"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
)

// Chain and set names inside podnet.TableName (family inet). The masquerade
// chain and masq-* sets of ipMasq live in the same table and are not ours.
const (
	chainDstnat    = "dstnat"         // nat prerouting: jump hostports
	chainDstnatOut = "dstnat-output"  // nat output: jump hostports
	chainHostports = "hostports"      // regular chain: fib check + 4 map lookups
	chainSrcnat    = "srcnat"         // nat postrouting: hairpin/localhost masquerade
	chainMartian   = "martian"        // filter prerouting at raw: 127/8 from outside
	chainLocalnet  = "localnet-reply" // filter prerouting before dstnat: mark for the tc guard

	setAny4     = "hostport4"        // inet_proto . inet_service : ipv4_addr . inet_service
	setAny6     = "hostport6"        // inet_proto . inet_service : ipv6_addr . inet_service
	setHostIP4  = "hostip-hostport4" // ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
	setHostIP6  = "hostip-hostport6" // ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service
	setHairpin4 = "hairpin4"         // ipv4_addr . ipv4_addr (pod . pod)
	setHairpin6 = "hairpin6"         // ipv6_addr . ipv6_addr
)

// Chain priorities; see README.md for why these are right next to
// kube-proxy (iptables-nft or nftables mode).
const (
	// PriorityMartian runs before conntrack (-200): spoofed 127/8 packets
	// are dropped before they create a conntrack entry or meet any NAT.
	PriorityMartian = nftables.ChainPriority(-300) // raw
	// PriorityLocalnet runs after conntrack (-200) and before the reply of
	// a localhost connection is de-NATed to 127.0.0.1 (-100).
	PriorityLocalnet = nftables.ChainPriority(-150)
	// PriorityDstnat is the standard nat prerouting/output priority.
	PriorityDstnat = nftables.ChainPriority(-100) // dstnat
	// PrioritySrcnat is the standard nat postrouting priority.
	PrioritySrcnat = nftables.ChainPriority(100) // srcnat
)

// ruleTag prefixes the comment of every rule we own; the base check
// compares the comments, so a changed rule set (new version, drift) is
// detected with one dump and rewritten.
const ruleTag = "qoscni-portmap/v1: "

// 32-bit registers (NFT_REG32_00...); concatenations are laid out in them
// one field per 4 bytes, which is how the kernel and nft expect it.
const (
	reg0 = 8 + iota
	reg1
	reg2
	reg3
	reg4
	reg5
)

var (
	typeAnyKey   = nftables.MustConcatSetType(nftables.TypeInetProto, nftables.TypeInetService)
	typeHostKey4 = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeInetService)
	typeHostKey6 = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetProto, nftables.TypeInetService)
	typeTarget4  = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService)
	typeTarget6  = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService)
	typePair4    = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeIPAddr)
	typePair6    = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeIP6Addr)
)

// layout is the fixed part of the ruleset: table, chains, sets, rules.
type layout struct {
	table                                                   *nftables.Table
	dstnat, dstnatOut, hostports, srcnat, martian, localnet *nftables.Chain
	any4, any6, hostIP4, hostIP6, hairpin4, hairpin6        *nftables.Set
}

func newLayout() *layout {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: podnet.TableName}
	mapSet := func(name string, key, data nftables.SetDatatype) *nftables.Set {
		return &nftables.Set{Table: t, Name: name, IsMap: true, Concatenation: true, KeyType: key, DataType: data}
	}
	set := func(name string, key nftables.SetDatatype) *nftables.Set {
		return &nftables.Set{Table: t, Name: name, Concatenation: true, KeyType: key}
	}
	return &layout{
		table: t,
		dstnat: &nftables.Chain{Name: chainDstnat, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPrerouting, Priority: ptr(PriorityDstnat)},
		dstnatOut: &nftables.Chain{Name: chainDstnatOut, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookOutput, Priority: ptr(PriorityDstnat)},
		hostports: &nftables.Chain{Name: chainHostports, Table: t},
		srcnat: &nftables.Chain{Name: chainSrcnat, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: ptr(PrioritySrcnat)},
		martian: &nftables.Chain{Name: chainMartian, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: ptr(PriorityMartian)},
		localnet: &nftables.Chain{Name: chainLocalnet, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: ptr(PriorityLocalnet)},
		any4:     mapSet(setAny4, typeAnyKey, typeTarget4),
		any6:     mapSet(setAny6, typeAnyKey, typeTarget6),
		hostIP4:  mapSet(setHostIP4, typeHostKey4, typeTarget4),
		hostIP6:  mapSet(setHostIP6, typeHostKey6, typeTarget6),
		hairpin4: set(setHairpin4, typePair4),
		hairpin6: set(setHairpin6, typePair6),
	}
}

func ptr[T any](v T) *T { return &v }

func (l *layout) sets() []*nftables.Set {
	return []*nftables.Set{l.any4, l.any6, l.hostIP4, l.hostIP6, l.hairpin4, l.hairpin6}
}

// mapFor returns the map a mapping's element lives in.
func (l *layout) mapFor(m Mapping) *nftables.Set {
	switch {
	case m.IPv6() && m.HostIP != nil:
		return l.hostIP6
	case m.IPv6():
		return l.any6
	case m.HostIP != nil:
		return l.hostIP4
	}
	return l.any4
}

func (l *layout) hairpinFor(podIP net.IP) *nftables.Set {
	if podIP.To4() == nil {
		return l.hairpin6
	}
	return l.hairpin4
}

// Key encodings. Every field of a concatenation takes a multiple of 4
// bytes, zero padded: inet_proto is 1+3, inet_service 2 (network order)+2.

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func addrBytes(ip net.IP) []byte {
	if v4 := ip.To4(); v4 != nil {
		return append([]byte(nil), v4...)
	}
	return append([]byte(nil), ip.To16()...)
}

func portBytes(p uint16) []byte { return []byte{byte(p >> 8), byte(p), 0, 0} }

// elemKey is the map key of a mapping.
func elemKey(m Mapping) []byte {
	proto, _ := protoNum(m.Protocol)
	var k []byte
	if m.HostIP != nil {
		k = addrBytes(m.HostIP)
	}
	k = append(k, pad4([]byte{proto})...)
	return append(k, portBytes(m.HostPort)...)
}

// elemValue is the DNAT target of a mapping.
func elemValue(m Mapping) []byte {
	return append(addrBytes(m.PodIP), portBytes(m.ContainerPort)...)
}

// hairpinKey is the element matching a pod talking to itself after DNAT.
func hairpinKey(podIP net.IP) []byte {
	a := addrBytes(podIP)
	return append(a, a...)
}

func comment(s string) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, ruleTag+s)
}

func ruleComment(r *nftables.Rule) string {
	s, _ := userdata.GetString(r.UserData, userdata.TypeComment)
	return s
}

func nfproto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

// ipsDstNAT is IPS_DST_NAT of enum ip_conntrack_status (ct status dnat).
const ipsDstNAT = 1 << 5

// enum ip_conntrack_dir.
const (
	ipCtDirOriginal = 0
	ipCtDirReply    = 1
)

// ctDNAT matches connections whose destination was translated.
func ctDNAT() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATUS, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

type ruleSpec struct {
	chain   *nftables.Chain
	comment string
	exprs   []expr.Any
}

// rules is the complete fixed rule set. Whatever the number of mappings, a
// packet meets at most 2 rules in martian, 1 in localnet-reply, 1 jump + 5
// rules in hostports and 3 in srcnat.
func (l *layout) rules() []ruleSpec {
	dport := &expr.Payload{Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}
	l4 := func(reg uint32) expr.Any { return &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg} }
	withReg := func(p expr.Payload, reg uint32) *expr.Payload { p.DestRegister = reg; return &p }
	daddr4 := expr.Payload{Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4}
	saddr4 := expr.Payload{Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4}
	daddr6 := expr.Payload{Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 16}
	saddr6 := expr.Payload{Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 16}
	lookup := func(s *nftables.Set, dreg bool) *expr.Lookup {
		return &expr.Lookup{SourceRegister: reg0, SetName: s.Name, SetID: s.ID, DestRegister: reg0, IsDestRegSet: dreg}
	}
	dnat4 := &expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: reg0, RegProtoMin: reg1}
	dnat6 := &expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV6, RegAddrMin: reg0, RegProtoMin: reg4}
	ifname := make([]byte, 16)
	copy(ifname, "lo")
	notLo := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname},
	}
	first := func(off uint32, b byte) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{b}},
		}
	}
	jump := func() []expr.Any {
		return []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: chainHostports}}
	}
	return []ruleSpec{
		{l.martian, "drop 127/8 source from outside (route_localnet guard)",
			cat(nfproto(unix.NFPROTO_IPV4), notLo, first(12, 127), []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}})},
		{l.martian, "drop 127/8 destination from outside (route_localnet guard)",
			cat(nfproto(unix.NFPROTO_IPV4), notLo, first(16, 127), []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}})},

		{l.localnet, "mark replies of translated localhost connections (localnet guard lets them pass)",
			cat(nfproto(unix.NFPROTO_IPV4), notLo, ctDNAT(), []expr.Any{
				&expr.Ct{Key: expr.CtKeyDIRECTION, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{ipCtDirReply}},
				// ct original saddr: the connection came from 127/8.
				&expr.Ct{Key: expr.CtKeySRC, Direction: ipCtDirOriginal, Register: 1},
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{0xff, 0, 0, 0}, Xor: make([]byte, 4)},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{127, 0, 0, 0}},
				&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
					Mask: binaryutil.NativeEndian.PutUint32(^uint32(localnetMark)), Xor: binaryutil.NativeEndian.PutUint32(localnetMark)},
				&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
			})},

		{l.hostports, "only traffic addressed to this node",
			[]expr.Any{
				&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
				&expr.Verdict{Kind: expr.VerdictReturn},
			}},
		{l.hostports, "ipv4 hostIP mappings",
			cat(nfproto(unix.NFPROTO_IPV4), []expr.Any{withReg(daddr4, reg0), l4(reg1), withReg(*dport, reg2), lookup(l.hostIP4, true), dnat4})},
		{l.hostports, "ipv4 any-address mappings",
			cat(nfproto(unix.NFPROTO_IPV4), []expr.Any{l4(reg0), withReg(*dport, reg1), lookup(l.any4, true), dnat4})},
		{l.hostports, "ipv6 hostIP mappings",
			cat(nfproto(unix.NFPROTO_IPV6), []expr.Any{withReg(daddr6, reg0), l4(reg4), withReg(*dport, reg5), lookup(l.hostIP6, true), dnat6})},
		{l.hostports, "ipv6 any-address mappings",
			cat(nfproto(unix.NFPROTO_IPV6), []expr.Any{l4(reg0), withReg(*dport, reg1), lookup(l.any6, true), dnat6})},

		{l.dstnat, "hostPorts from outside", jump()},
		{l.dstnatOut, "hostPorts from the node itself", jump()},

		{l.srcnat, "localhost to a hostPort: the pod cannot answer 127/8",
			cat(nfproto(unix.NFPROTO_IPV4), ctDNAT(), first(12, 127), []expr.Any{&expr.Masq{}})},
		{l.srcnat, "ipv4 hairpin: pod to its own hostPort",
			cat(nfproto(unix.NFPROTO_IPV4), ctDNAT(), []expr.Any{withReg(saddr4, reg0), withReg(daddr4, reg1), lookup(l.hairpin4, false), &expr.Masq{}})},
		{l.srcnat, "ipv6 hairpin: pod to its own hostPort",
			cat(nfproto(unix.NFPROTO_IPV6), ctDNAT(), []expr.Any{withReg(saddr6, reg0), withReg(daddr6, reg4), lookup(l.hairpin6, false), &expr.Masq{}})},
	}
}

// chains in creation order: hostports before the chains that jump to it.
func (l *layout) chains() []*nftables.Chain {
	return []*nftables.Chain{l.martian, l.localnet, l.hostports, l.dstnat, l.dstnatOut, l.srcnat}
}
