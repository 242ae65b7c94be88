package ipam

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"net"
	"net/netip"
	"strings"
)

// span is one validated Range in netip form.
type span struct {
	prefix     netip.Prefix
	network    netip.Addr
	broadcast  netip.Addr // zero for IPv6, which has none
	start, end netip.Addr
	gateway    netip.Addr
}

func newSpan(p netip.Prefix) span {
	s := span{prefix: p, network: p.Addr()}
	if p.Addr().Is4() {
		s.broadcast = lastAddr(p)
	}
	return s
}

func (s span) contains(a netip.Addr) bool {
	return s.start.BitLen() == a.BitLen() && s.start.Compare(a) <= 0 && a.Compare(s.end) <= 0
}

func (s span) overlaps(o span) bool {
	return s.start.BitLen() == o.start.BitLen() && s.start.Compare(o.end) <= 0 && o.start.Compare(s.end) <= 0
}

func (s span) interval() string { return s.start.String() + "-" + s.end.String() }

// rangeSet is one validated RangeSet.
type rangeSet struct {
	index int
	spans []span
	label string // subnets for messages, e.g. "10.22.0.0/24" or "10.22.0.0/24,10.23.0.0/24"
}

func newRangeSet(index int, spans []span) rangeSet {
	names := make([]string, len(spans))
	for i, s := range spans {
		names[i] = s.prefix.String()
	}
	return rangeSet{index: index, spans: spans, label: strings.Join(names, ",")}
}

func (rs *rangeSet) spanOf(a netip.Addr) int {
	for i, s := range rs.spans {
		if s.contains(a) {
			return i
		}
	}
	return -1
}

// skip reports addresses never handed out: network, IPv4 broadcast and every gateway of
// the config (a gateway of one range may lie inside another range of the same subnet).
func skip(s *span, a netip.Addr, gateways []netip.Addr) bool {
	if a == s.network || a == s.broadcast {
		return true
	}
	for _, g := range gateways {
		if a == g {
			return true
		}
	}
	return false
}

// walk calls try on every allocatable address of the set once, round-robin: it starts
// right after hint (or at the beginning if hint is not in the set), wraps, and ends with
// hint itself. It stops when try returns true. The walk never enumerates a range up
// front, so a /64 costs only as many steps as there are taken addresses in the way.
func (rs *rangeSet) walk(hint netip.Addr, gateways []netip.Addr, try func(netip.Addr) bool) {
	segment := func(s *span, from, to netip.Addr) bool {
		if !from.IsValid() || from.Compare(to) > 0 {
			return false
		}
		for a := from; ; a = a.Next() {
			if !skip(s, a, gateways) && try(a) {
				return true
			}
			if a == to {
				return false
			}
		}
	}
	n := len(rs.spans)
	h := -1
	if hint.IsValid() {
		h = rs.spanOf(hint)
	}
	if h < 0 {
		for i := range rs.spans {
			if segment(&rs.spans[i], rs.spans[i].start, rs.spans[i].end) {
				return
			}
		}
		return
	}
	if hint != rs.spans[h].end && segment(&rs.spans[h], hint.Next(), rs.spans[h].end) {
		return
	}
	for k := 1; k < n; k++ {
		s := &rs.spans[(h+k)%n]
		if segment(s, s.start, s.end) {
			return
		}
	}
	segment(&rs.spans[h], rs.spans[h].start, hint)
}

// allocatable counts the addresses walk can offer, saturating at math.MaxUint64.
func (rs *rangeSet) allocatable(gateways []netip.Addr) uint64 {
	var total uint64
	for i := range rs.spans {
		s := &rs.spans[i]
		n := size(s.start, s.end)
		if n == math.MaxUint64 {
			return math.MaxUint64
		}
		skipped := map[netip.Addr]bool{}
		for _, a := range append([]netip.Addr{s.network, s.broadcast}, gateways...) {
			if a.IsValid() && s.contains(a) {
				skipped[a] = true
			}
		}
		n -= uint64(len(skipped))
		if total+n < total {
			return math.MaxUint64
		}
		total += n
	}
	return total
}

// size is end-start+1 for addresses of one family, saturating at math.MaxUint64.
func size(start, end netip.Addr) uint64 {
	x, y := start.As16(), end.As16()
	lo, borrow := bits.Sub64(binary.BigEndian.Uint64(y[8:]), binary.BigEndian.Uint64(x[8:]), 0)
	hi, _ := bits.Sub64(binary.BigEndian.Uint64(y[:8]), binary.BigEndian.Uint64(x[:8]), borrow)
	if hi != 0 || lo == math.MaxUint64 {
		return math.MaxUint64
	}
	return lo + 1
}

// lastAddr returns the highest address of p (the IPv4 broadcast address).
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// addrOf converts a net.IP, which stores IPv4 in 4 or 16 bytes, to an unmapped netip.Addr.
func addrOf(ip net.IP) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// prefixOf converts a subnet; the mask length decides the family because types.ParseCIDR
// keeps IPv4 addresses in their 16-byte form.
func prefixOf(n *net.IPNet) (netip.Prefix, error) {
	ones, total := n.Mask.Size()
	var a netip.Addr
	switch total {
	case 32:
		ip4 := n.IP.To4()
		if ip4 == nil {
			return netip.Prefix{}, errors.New("IPv4 mask on a non-IPv4 address")
		}
		a = netip.AddrFrom4([4]byte(ip4))
	case 128:
		if len(n.IP) != net.IPv6len || n.IP.To4() != nil {
			return netip.Prefix{}, errors.New("IPv4-mapped IPv6 subnets are not supported")
		}
		a = netip.AddrFrom16([16]byte(n.IP))
	default:
		return netip.Prefix{}, fmt.Errorf("invalid mask %s", n.Mask)
	}
	return netip.PrefixFrom(a, ones), nil
}
