package netpolnft

import (
	"encoding/binary"
	"net/netip"
	"slices"

	"github.com/qoscni/qoscni/internal/nfraw"
)

// L4 is a range of IP protocols and one of destination ports.
type L4 struct {
	ProtoLo, ProtoHi uint8
	PortLo, PortHi   uint16
}

// AnyL4 is every protocol and port.
var AnyL4 = L4{ProtoLo: 0, ProtoHi: 255, PortLo: 0, PortHi: 65535}

// IdentAllow lets the node's pod address Pod and the pods of identity
// Ident talk (from them for ingress, to them for egress).
type IdentAllow struct {
	Pod   netip.Addr
	Ident uint32
	L4    L4
}

// BlockAllow lets Pod and the addresses PeerLo to PeerHi (Pod's family)
// talk.
type BlockAllow struct {
	Pod            netip.Addr
	PeerLo, PeerHi netip.Addr
	L4             L4
}

// State is every policy element of a node. Allowances of one pod must
// not overlap (interval sets refuse that); internal/agent/netpol makes
// them so.
type State struct {
	// Idents maps pod addresses (any node's) to identities (not 0).
	Idents                          map[netip.Addr]uint32
	IngressIsolated, EgressIsolated map[netip.Addr]struct{}
	IngressIdent, EgressIdent       []IdentAllow
	IngressBlock, EgressBlock       []BlockAllow
	// Ready are the node's pod addresses to take out of the pending set,
	// with the attachment whose policy the rest of the state is: a
	// pending element of another owner (the address went to a new pod
	// since) stays.
	Ready map[netip.Addr]Owner
}

// identities are the identities of Idents, in order.
func (s *State) identities() []uint32 {
	seen := map[uint32]bool{}
	var out []uint32
	for _, id := range s.Idents {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// identBytes is an identity as a mark (host byte order, as nft shows it).
func identBytes(id uint32) []byte { return binary.NativeEndian.AppendUint32(nil, id) }

// field pads a concatenation field to 4 bytes.
func field(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func port(p uint16) []byte { return field(binary.BigEndian.AppendUint16(nil, p)) }

func concat(fields ...[]byte) []byte {
	var out []byte
	for _, f := range fields {
		out = append(out, field(f)...)
	}
	return out
}

// Shapes of an allowance's protocols and ports, by the set that holds it.
const (
	shapeAny   = iota // every protocol and port: np-iida
	shapeProto        // one protocol, every port: np-iidp
	shapePort         // one protocol, one port: np-iidx
	shapeRange        // anything else: np-iid (intervals)
)

func shapeOf(l L4) int {
	switch {
	case l == AnyL4:
		return shapeAny
	case l.ProtoLo != l.ProtoHi:
		return shapeRange
	case l.PortLo == 0 && l.PortHi == 65535:
		return shapeProto
	case l.PortLo == l.PortHi:
		return shapePort
	}
	return shapeRange
}

// identSets are the sets of allowances by identity: direction and shape.
var identSets = map[string]struct {
	egress bool
	shape  int
}{
	setIngIDAny: {false, shapeAny}, setIngIDProto: {false, shapeProto}, setIngIDPort: {false, shapePort}, setIngID: {false, shapeRange},
	setEgrIDAny: {true, shapeAny}, setEgrIDProto: {true, shapeProto}, setEgrIDPort: {true, shapePort}, setEgrID: {true, shapeRange},
}

// identElement is a's element in the set of its shape.
func identElement(a IdentAllow) nfraw.Element {
	pod, _ := addrKey(a.Pod)
	id := identBytes(a.Ident)
	switch shapeOf(a.L4) {
	case shapeAny:
		return nfraw.Element{Key: concat(pod, id)}
	case shapeProto:
		return nfraw.Element{Key: concat(pod, id, []byte{a.L4.ProtoLo})}
	case shapePort:
		return nfraw.Element{Key: concat(pod, id, []byte{a.L4.ProtoLo}, port(a.L4.PortLo))}
	}
	return nfraw.Element{
		Key:    concat(pod, id, []byte{a.L4.ProtoLo}, port(a.L4.PortLo)),
		KeyEnd: concat(pod, id, []byte{a.L4.ProtoHi}, port(a.L4.PortHi)),
	}
}

func blockElement(a BlockAllow) nfraw.Element {
	pod, _ := addrKey(a.Pod)
	lo, _ := addrKey(a.PeerLo)
	hi, _ := addrKey(a.PeerHi)
	return nfraw.Element{
		Key:    concat(pod, lo, []byte{a.L4.ProtoLo}, port(a.L4.PortLo)),
		KeyEnd: concat(pod, hi, []byte{a.L4.ProtoHi}, port(a.L4.PortHi)),
	}
}

// elements are the elements of set kind of family v6 that s holds.
func (s *State) elements(kind string, v6 bool) []nfraw.Element {
	var out []nfraw.Element
	addrs := func(m map[netip.Addr]struct{}) {
		for a := range m {
			if key, is6 := addrKey(a); is6 == v6 {
				out = append(out, nfraw.Element{Key: key})
			}
		}
	}
	idents := func(l []IdentAllow, shape int) {
		for _, a := range l {
			if a.Pod.Unmap().Is6() == v6 && shapeOf(a.L4) == shape {
				out = append(out, identElement(a))
			}
		}
	}
	blocks := func(l []BlockAllow) {
		for _, a := range l {
			if a.Pod.Unmap().Is6() == v6 {
				out = append(out, blockElement(a))
			}
		}
	}
	if is, ok := identSets[kind]; ok {
		if is.egress {
			idents(s.EgressIdent, is.shape)
		} else {
			idents(s.IngressIdent, is.shape)
		}
		return out
	}
	switch kind {
	case setPeerIn, setPeerOut:
		for a, id := range s.Idents {
			if key, is6 := addrKey(a); is6 == v6 {
				out = append(out, nfraw.Element{Key: key, Jump: identChain(id, kind == setPeerOut)})
			}
		}
	case setIngIso:
		addrs(s.IngressIsolated)
	case setEgrIso:
		addrs(s.EgressIsolated)
	case setIngBlk:
		blocks(s.IngressBlock)
	case setEgrBlk:
		blocks(s.EgressBlock)
	}
	return out
}
