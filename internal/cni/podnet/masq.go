package podnet

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/nfraw"
)

// TableName is the nftables table qoscni owns (family inet). Every feature
// keeps its per-pod data as set or map elements in it, so an ADD or DEL is
// one batch whose cost does not depend on the number of pods.
const TableName = "qoscni"

const (
	masqChain = "masquerade"
	masqSrc4  = "masq-src4"
	masqSrc6  = "masq-src6"
	masqSkip4 = "masq-skip-dst4"
	masqSkip6 = "masq-skip-dst6"
	// The cluster's pod CIDRs (every node's spec.podCIDRs), written by the
	// agent only. Kept apart from masq-skip-dst, which the plugin fills
	// and never shrinks, so that a node leaving removes exactly its own
	// CIDR and never a subnet the plugin added.
	masqCluster4 = "masq-skip-cluster4"
	masqCluster6 = "masq-skip-cluster6"
	masqRuleNum  = 2
)

// Multicast is never masqueraded (as the reference bridge plugin does).
var multicast = []net.IPNet{
	{IP: net.IPv4(224, 0, 0, 0).To4(), Mask: net.CIDRMask(4, 32)},
	{IP: net.ParseIP("ff00::"), Mask: net.CIDRMask(8, 128)},
}

// Masq manages ipMasq: a pod address in masq-src{4,6} is masqueraded when
// it talks to a destination outside both interval sets masq-skip-dst{4,6}
// (the node's pod subnets and multicast, kept by the plugin) and
// masq-skip-cluster{4,6} (the other nodes' pod CIDRs, kept by the agent,
// so that pod-to-pod traffic across nodes keeps its source address).
type Masq struct {
	conn     *nftables.Conn
	table    *nftables.Table
	src4     *nftables.Set
	src6     *nftables.Set
	skip4    *nftables.Set
	skip6    *nftables.Set
	cluster4 *nftables.Set
	cluster6 *nftables.Set
	chain    *nftables.Chain
}

// NewMasq opens nftables in the namespace nsFd (-1 = the current one).
func NewMasq(nsFd int) (*Masq, error) {
	var opts []nftables.ConnOption
	if nsFd >= 0 {
		opts = append(opts, nftables.WithNetNSFd(nsFd))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	return &Masq{
		conn:     c,
		table:    t,
		src4:     &nftables.Set{Table: t, Name: masqSrc4, KeyType: nftables.TypeIPAddr},
		src6:     &nftables.Set{Table: t, Name: masqSrc6, KeyType: nftables.TypeIP6Addr},
		skip4:    &nftables.Set{Table: t, Name: masqSkip4, KeyType: nftables.TypeIPAddr, Interval: true},
		skip6:    &nftables.Set{Table: t, Name: masqSkip6, KeyType: nftables.TypeIP6Addr, Interval: true},
		cluster4: &nftables.Set{Table: t, Name: masqCluster4, KeyType: nftables.TypeIPAddr, Interval: true},
		cluster6: &nftables.Set{Table: t, Name: masqCluster6, KeyType: nftables.TypeIP6Addr, Interval: true},
		chain: &nftables.Chain{
			Name: masqChain, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource,
		},
	}, nil
}

func (m *Masq) rules() []*nftables.Rule {
	// nfproto, saddr in @src, daddr not in @skip, daddr not in @cluster,
	// masquerade. daddr is loaded again before the second lookup only so
	// that nft lists the rule readably; the register still holds it.
	mk := func(proto byte, srcOff, dstOff, alen uint32, src, skip, cluster *nftables.Set) *nftables.Rule {
		return &nftables.Rule{Table: m.table, Chain: m.chain, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: srcOff, Len: alen},
			&expr.Lookup{SourceRegister: 1, SetName: src.Name, SetID: src.ID},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: dstOff, Len: alen},
			&expr.Lookup{SourceRegister: 1, SetName: skip.Name, SetID: skip.ID, Invert: true},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: dstOff, Len: alen},
			&expr.Lookup{SourceRegister: 1, SetName: cluster.Name, SetID: cluster.ID, Invert: true},
			&expr.Masq{},
		}}
	}
	return []*nftables.Rule{
		mk(unix.NFPROTO_IPV4, 12, 16, 4, m.src4, m.skip4, m.cluster4),
		mk(unix.NFPROTO_IPV6, 8, 24, 16, m.src6, m.skip6, m.cluster6),
	}
}

// baseReady reports whether the table, chain and the current rules are in
// place. Rules of an older version (without the cluster lookup) are not
// ready: the next Add or SetClusterCIDRs replaces them in one batch.
func (m *Masq) baseReady() bool {
	rules, err := m.conn.GetRules(m.table, m.chain)
	if err != nil || len(rules) != masqRuleNum {
		return false
	}
	for i, want := range m.rules() {
		if !slices.Equal(lookupSets(rules[i]), lookupSets(want)) {
			return false
		}
	}
	return true
}

func lookupSets(r *nftables.Rule) []string {
	var names []string
	for _, e := range r.Exprs {
		if l, ok := e.(*expr.Lookup); ok {
			names = append(names, l.SetName)
		}
	}
	return names
}

// ensureBase creates the table, sets, chain and rules when they are not
// all there, with multicast in the skip sets, in one batch.
func (m *Masq) ensureBase() error {
	if m.baseReady() {
		return nil
	}
	if err := m.queueBase(); err != nil {
		return err
	}
	for _, mc := range multicast {
		s := m.skip4
		if mc.IP.To4() == nil {
			s = m.skip6
		}
		if err := m.conn.SetAddElements(s, intervalElems(prefixInterval(mc))); err != nil {
			return fmt.Errorf("add multicast to %s: %w", s.Name, err)
		}
	}
	if err := m.conn.Flush(); err != nil {
		return fmt.Errorf("create nftables table %s for ipMasq: %w", TableName, err)
	}
	return nil
}

// queueBase adds the table, sets, chain and rules to the pending batch,
// replacing whatever rules the chain has (drift or an older version).
func (m *Masq) queueBase() error {
	m.conn.AddTable(m.table)
	for _, s := range []*nftables.Set{m.src4, m.src6, m.skip4, m.skip6, m.cluster4, m.cluster6} {
		if err := m.conn.AddSet(s, nil); err != nil {
			return fmt.Errorf("add set %s: %w", s.Name, err)
		}
	}
	m.conn.AddChain(m.chain)
	m.conn.FlushChain(m.chain)
	for _, r := range m.rules() {
		m.conn.AddRule(r)
	}
	return nil
}

func ipKey(ip net.IP) []byte {
	if v4 := ip.To4(); v4 != nil {
		return v4
	}
	return ip.To16()
}

// interval is [lo, hi) in key bytes; hi == nil means up to the top of the space.
type interval struct{ lo, hi []byte }

func prefixInterval(n net.IPNet) interval {
	lo := ipKey(n.IP.Mask(n.Mask))
	hi := make([]byte, len(lo))
	mask := n.Mask
	if len(mask) != len(lo) {
		mask = mask[len(mask)-len(lo):]
	}
	for i := range lo {
		hi[i] = lo[i] | ^mask[i]
	}
	// One past the last address; overflow means the interval is open-ended.
	for i := len(hi) - 1; i >= 0; i-- {
		hi[i]++
		if hi[i] != 0 {
			return interval{lo, hi}
		}
	}
	return interval{lo, nil}
}

func (iv interval) overlaps(o interval) bool {
	// [a,b) and [c,d) overlap when a < d and c < b (nil = +inf).
	less := func(x, y []byte) bool { return y == nil || (x != nil && bytes.Compare(x, y) < 0) }
	return less(iv.lo, o.hi) && less(o.lo, iv.hi)
}

func (m *Masq) intervals(s *nftables.Set) ([]interval, error) {
	elems, err := m.conn.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("list set %s: %w", s.Name, err)
	}
	sort.Slice(elems, func(i, j int) bool { return bytes.Compare(elems[i].Key, elems[j].Key) < 0 })
	var out []interval
	for i := 0; i < len(elems); i++ {
		if elems[i].IntervalEnd {
			continue
		}
		iv := interval{lo: elems[i].Key}
		if i+1 < len(elems) && elems[i+1].IntervalEnd {
			iv.hi = elems[i+1].Key
			i++
		}
		out = append(out, iv)
	}
	return out, nil
}

func intervalElems(iv interval) []nftables.SetElement {
	el := []nftables.SetElement{{Key: iv.lo}}
	if iv.hi != nil {
		el = append(el, nftables.SetElement{Key: iv.hi, IntervalEnd: true})
	}
	return el
}

// Add makes each pod address masqueraded towards everything outside its
// subnet, in one batch.
func (m *Masq) Add(addrs []net.IPNet) error {
	if err := m.ensureBase(); err != nil {
		return err
	}
	for _, a := range addrs {
		src, skip := m.src4, m.skip4
		if a.IP.To4() == nil {
			src, skip = m.src6, m.skip6
		}
		subnet := prefixInterval(net.IPNet{IP: a.IP.Mask(a.Mask), Mask: a.Mask})
		have, err := m.intervals(skip)
		if err != nil {
			return err
		}
		covered := false
		for _, h := range have {
			if h.overlaps(subnet) {
				covered = true
				break
			}
		}
		if !covered {
			if err := m.conn.SetAddElements(skip, intervalElems(subnet)); err != nil {
				return fmt.Errorf("add subnet %s to %s: %w", a.String(), skip.Name, err)
			}
		}
		if err := m.conn.SetAddElements(src, []nftables.SetElement{{Key: ipKey(a.IP)}}); err != nil {
			return fmt.Errorf("add %s to %s: %w", a.IP, src.Name, err)
		}
	}
	if err := m.conn.Flush(); err != nil {
		return fmt.Errorf("add ipMasq for %v: %w", addrs, err)
	}
	return nil
}

// Del removes pod addresses from the masquerade sets. Addresses that are
// not there (already removed, or never added) are not an error.
func (m *Masq) Del(ips []net.IP) error {
	if len(ips) == 0 {
		return nil
	}
	var errs []error
	for _, ip := range ips {
		src := m.src4
		if ip.To4() == nil {
			src = m.src6
		}
		// One element per batch: a missing element fails its whole batch.
		if err := m.conn.SetDeleteElements(src, []nftables.SetElement{{Key: ipKey(ip)}}); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := m.conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove %s from %s: %w", ip, src.Name, err))
		}
	}
	return errors.Join(errs...)
}

// QueueMasqDel puts the removal of the addresses' masquerade elements that
// are there into b, to be sent on r in one transaction with other
// removals (Del sends one transaction per address).
func QueueMasqDel(r *nfraw.Conn, b *nfraw.Batch, ips []net.IP) error {
	for _, ip := range ips {
		set := masqSrc4
		if ip.To4() == nil {
			set = masqSrc6
		}
		key := ipKey(ip)
		_, found, err := r.GetElem(TableName, set, key)
		if err != nil {
			return fmt.Errorf("look up %s in %s: %w", ip, set, err)
		}
		if found {
			if err := b.Delete(TableName, set, key); err != nil {
				return err
			}
		}
	}
	return nil
}

// Has reports whether an address is in its masquerade set.
func (m *Masq) Has(ip net.IP) (bool, error) {
	src := m.src4
	if ip.To4() == nil {
		src = m.src6
	}
	// Any version of the rules will do: CHECK asks about the element.
	if rules, err := m.conn.GetRules(m.table, m.chain); err != nil || len(rules) != masqRuleNum {
		return false, nil
	}
	elems, err := m.conn.GetSetElements(src)
	if err != nil {
		return false, fmt.Errorf("list set %s: %w", src.Name, err)
	}
	k := ipKey(ip)
	for _, e := range elems {
		if bytes.Equal(e.Key, k) {
			return true, nil
		}
	}
	return false, nil
}

// SetClusterCIDRs makes the destination sets masq-skip-cluster{4,6} hold
// exactly nets (the pod CIDRs of every node), so that pods keep their
// source address towards pods on other nodes. Overlapping and adjacent
// CIDRs are merged first (an interval set takes no overlaps); only the
// intervals that differ from the kernel's are added or removed, in one
// batch, so an unchanged cluster costs two set listings. It creates the
// table when the plugin has not yet (ipMasq pods may come later).
func (m *Masq) SetClusterCIDRs(nets []net.IPNet) error {
	if err := m.ensureBase(); err != nil {
		return err
	}
	var want4, want6 []interval
	for _, n := range nets {
		if n.IP.To4() != nil {
			want4 = append(want4, prefixInterval(n))
		} else if n.IP.To16() != nil {
			want6 = append(want6, prefixInterval(n))
		}
	}
	changed := false
	for _, f := range []struct {
		set  *nftables.Set
		want []interval
	}{{m.cluster4, mergeIntervals(want4)}, {m.cluster6, mergeIntervals(want6)}} {
		have, err := m.intervals(f.set)
		if err != nil {
			return err
		}
		for _, h := range have {
			if !slices.ContainsFunc(f.want, h.equal) {
				if err := m.conn.SetDeleteElements(f.set, intervalElems(h)); err != nil {
					return fmt.Errorf("remove cluster CIDR from %s: %w", f.set.Name, err)
				}
				changed = true
			}
		}
		for _, w := range f.want {
			if !slices.ContainsFunc(have, w.equal) {
				if err := m.conn.SetAddElements(f.set, intervalElems(w)); err != nil {
					return fmt.Errorf("add cluster CIDR to %s: %w", f.set.Name, err)
				}
				changed = true
			}
		}
	}
	if !changed {
		return nil
	}
	if err := m.conn.Flush(); err != nil {
		return fmt.Errorf("set cluster pod CIDRs %v in %s: %w", nets, TableName, err)
	}
	return nil
}

func (iv interval) equal(o interval) bool {
	return bytes.Equal(iv.lo, o.lo) && bytes.Equal(iv.hi, o.hi) && (iv.hi == nil) == (o.hi == nil)
}

// mergeIntervals sorts intervals of one family and joins those that
// overlap or touch.
func mergeIntervals(ivs []interval) []interval {
	if len(ivs) == 0 {
		return nil
	}
	s := slices.Clone(ivs)
	slices.SortFunc(s, func(a, b interval) int { return bytes.Compare(a.lo, b.lo) })
	out := []interval{s[0]}
	for _, iv := range s[1:] {
		last := &out[len(out)-1]
		if last.hi != nil && bytes.Compare(iv.lo, last.hi) > 0 {
			out = append(out, iv)
			continue
		}
		// Overlapping or adjacent: extend to the later end (nil = top).
		if last.hi != nil && (iv.hi == nil || bytes.Compare(iv.hi, last.hi) > 0) {
			last.hi = iv.hi
		}
	}
	return out
}

// Repair makes the masquerade chain, its sets and the elements addrs call
// for present, in one batch: each address in masq-src{4,6}, its subnet
// and multicast in masq-skip-dst{4,6} (as Add and ensureBase put them).
// Nothing is removed. masq-skip-cluster{4,6} is the agent's node watcher's
// to fill (SetClusterCIDRs, on its own resync). It reports whether the
// base was rebuilt and how many elements it added.
func (m *Masq) Repair(addrs []net.IPNet) (base bool, added int, err error) {
	ready := m.baseReady()
	if !ready {
		if err := m.queueBase(); err != nil {
			return false, 0, err
		}
	}
	for _, f := range []struct {
		src, skip *nftables.Set
		v4        bool
	}{{m.src4, m.skip4, true}, {m.src6, m.skip6, false}} {
		var want []net.IPNet
		for _, a := range addrs {
			if (a.IP.To4() != nil) == f.v4 {
				want = append(want, a)
			}
		}
		// Without the base, a set may be missing: google/nftables v0.3.0
		// drops the errno, so any listing error then counts as an empty
		// set (re-adding an element that is there is no error).
		haveSkip, err := m.intervals(f.skip)
		if err != nil && ready {
			return false, 0, err
		}
		haveSrc, err := m.conn.GetSetElements(f.src)
		if err != nil && ready {
			return false, 0, fmt.Errorf("list set %s: %w", f.src.Name, err)
		}
		skips := make([]interval, 0, len(want)+1)
		for _, mc := range multicast {
			if (mc.IP.To4() != nil) == f.v4 {
				skips = append(skips, prefixInterval(mc))
			}
		}
		for _, a := range want {
			skips = append(skips, prefixInterval(net.IPNet{IP: a.IP.Mask(a.Mask), Mask: a.Mask}))
		}
		for _, iv := range skips {
			if slices.ContainsFunc(haveSkip, iv.overlaps) {
				continue
			}
			if err := m.conn.SetAddElements(f.skip, intervalElems(iv)); err != nil {
				return false, 0, fmt.Errorf("add %x to %s: %w", iv.lo, f.skip.Name, err)
			}
			haveSkip = append(haveSkip, iv)
			added++
		}
		for _, a := range want {
			k := ipKey(a.IP)
			if slices.ContainsFunc(haveSrc, func(e nftables.SetElement) bool { return bytes.Equal(e.Key, k) }) {
				continue
			}
			if err := m.conn.SetAddElements(f.src, []nftables.SetElement{{Key: k}}); err != nil {
				return false, 0, fmt.Errorf("add %s to %s: %w", a.IP, f.src.Name, err)
			}
			haveSrc = append(haveSrc, nftables.SetElement{Key: k})
			added++
		}
	}
	if ready && added == 0 {
		return false, 0, nil
	}
	if err := m.conn.Flush(); err != nil {
		return false, 0, fmt.Errorf("restore ipMasq in nftables table %s: %w", TableName, err)
	}
	return !ready, added, nil
}
