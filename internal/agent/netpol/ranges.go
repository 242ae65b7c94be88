package netpol

import (
	"fmt"
	"net/netip"
	"slices"

	networkingv1 "k8s.io/api/networking/v1"
)

// span is an address range, lo to hi inclusive, of one family.
type span struct{ lo, hi netip.Addr }

// fullRange is every address of a's family.
func fullRange(a netip.Addr) (lo, hi netip.Addr) {
	if a.Is4() {
		return netip.AddrFrom4([4]byte{}), netip.AddrFrom4([4]byte{255, 255, 255, 255})
	}
	var ones [16]byte
	for i := range ones {
		ones[i] = 0xff
	}
	return netip.AddrFrom16([16]byte{}), netip.AddrFrom16(ones)
}

// prefixSpan is the addresses of p.
func prefixSpan(p netip.Prefix) span {
	p = p.Masked()
	lo := p.Addr()
	b := lo.AsSlice()
	host := lo.BitLen() - p.Bits()
	for i := len(b) - 1; host > 0; i-- {
		n := min(host, 8)
		b[i] |= byte(1<<n - 1)
		host -= n
	}
	hi, _ := netip.AddrFromSlice(b)
	return span{lo, hi}
}

// blockRanges are the addresses of an ipBlock: its cidr without its
// excepts.
func blockRanges(b *networkingv1.IPBlock) ([]span, error) {
	p, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		return nil, fmt.Errorf("cidr: %w", err)
	}
	p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-bitsUnmapped(p))
	out := []span{prefixSpan(p)}
	for i, e := range b.Except {
		x, err := netip.ParsePrefix(e)
		if err != nil {
			return nil, fmt.Errorf("except[%d]: %w", i, err)
		}
		x = netip.PrefixFrom(x.Addr().Unmap(), x.Bits()-bitsUnmapped(x))
		if x.Addr().Is4() != p.Addr().Is4() {
			continue
		}
		out = subtract(out, prefixSpan(x))
	}
	return out, nil
}

// bitsUnmapped is what a v4-mapped v6 prefix loses when unmapped.
func bitsUnmapped(p netip.Prefix) int {
	if p.Addr().Is4In6() {
		return 96
	}
	return 0
}

// subtract removes x from each span.
func subtract(spans []span, x span) []span {
	var out []span
	for _, s := range spans {
		if x.hi.Less(s.lo) || s.hi.Less(x.lo) {
			out = append(out, s)
			continue
		}
		if s.lo.Less(x.lo) {
			out = append(out, span{s.lo, x.lo.Prev()})
		}
		if x.hi.Less(s.hi) {
			out = append(out, span{x.hi.Next(), s.hi})
		}
	}
	return out
}

// builder collects one direction's allowances and makes them disjoint.
type builder struct {
	idents map[identKey][]L4
	blocks map[netip.Addr][]blockPart
}

type identKey struct {
	pod   netip.Addr
	ident uint32
}

type blockPart struct {
	span
	l4 L4
}

func newBuilder() *builder {
	return &builder{idents: map[identKey][]L4{}, blocks: map[netip.Addr][]blockPart{}}
}

func (b *builder) ident(pod netip.Addr, id uint32, l4 L4) {
	k := identKey{pod.Unmap(), id}
	b.idents[k] = append(b.idents[k], l4)
}

func (b *builder) block(pod, lo, hi netip.Addr, l4 L4) {
	pod = pod.Unmap()
	b.blocks[pod] = append(b.blocks[pod], blockPart{span{lo.Unmap(), hi.Unmap()}, l4})
}

// rules are the allowances as elements that do not overlap within a pod.
func (b *builder) rules() Rules {
	r := Rules{Ident: map[IdentRule]struct{}{}, Block: map[BlockRule]struct{}{}}
	for k, l4s := range b.idents {
		for _, l4 := range mergeL4(l4s) {
			r.Ident[IdentRule{Pod: k.pod, Ident: k.ident, L4: l4}] = struct{}{}
		}
	}
	for pod, parts := range b.blocks {
		for _, p := range disjoint(parts) {
			for _, l4 := range p.l4s {
				r.Block[BlockRule{Pod: pod, PeerLo: p.lo, PeerHi: p.hi, L4: l4}] = struct{}{}
			}
		}
	}
	return r
}

// mergeL4 is the union of l4s as disjoint ranges: AnyL4 alone, or per
// protocol its port ranges merged, in order.
func mergeL4(l4s []L4) []L4 {
	if slices.Contains(l4s, AnyL4) {
		return []L4{AnyL4}
	}
	s := slices.Clone(l4s)
	slices.SortFunc(s, func(a, b L4) int {
		if a.ProtoLo != b.ProtoLo {
			return int(a.ProtoLo) - int(b.ProtoLo)
		}
		return int(a.PortLo) - int(b.PortLo)
	})
	var out []L4
	for _, l := range s {
		if n := len(out); n > 0 && out[n-1].ProtoLo == l.ProtoLo && int(l.PortLo) <= int(out[n-1].PortHi)+1 {
			out[n-1].PortHi = max(out[n-1].PortHi, l.PortHi)
			continue
		}
		out = append(out, l)
	}
	return out
}

// merged is an address range with its merged port ranges.
type merged struct {
	span
	l4s []L4
}

// disjoint cuts overlapping address ranges at every boundary, gives each
// piece the union of what covers it, and joins neighbours that allow the
// same.
func disjoint(parts []blockPart) []merged {
	// Boundaries: each start, and the address after each end (none past
	// the family's last address).
	var cuts []netip.Addr
	for _, p := range parts {
		cuts = append(cuts, p.lo)
		if n := p.hi.Next(); n.IsValid() {
			cuts = append(cuts, n)
		}
	}
	slices.SortFunc(cuts, func(a, b netip.Addr) int { return a.Compare(b) })
	cuts = slices.Compact(cuts)
	var out []merged
	for i, lo := range cuts {
		hi := lastOf(lo)
		if i+1 < len(cuts) && cuts[i+1].Is4() == lo.Is4() {
			hi = cuts[i+1].Prev()
		}
		var l4s []L4
		for _, p := range parts {
			if p.lo.Is4() == lo.Is4() && !lo.Less(p.lo) && !p.hi.Less(lo) {
				l4s = append(l4s, p.l4)
			}
		}
		if len(l4s) == 0 {
			continue
		}
		l4s = mergeL4(l4s)
		if n := len(out); n > 0 && out[n-1].hi.Next() == lo && slices.Equal(out[n-1].l4s, l4s) {
			out[n-1].hi = hi
			continue
		}
		out = append(out, merged{span{lo, hi}, l4s})
	}
	return out
}

// lastOf is the last address of a's family.
func lastOf(a netip.Addr) netip.Addr {
	_, hi := fullRange(a)
	return hi
}
