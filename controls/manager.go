package controls

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
)

// Owner is the attachment an element belongs to; see nfraw.Owner.
type Owner = nfraw.Owner

// Manager programs the controls in one network namespace; Close it.
type Manager struct {
	*nfraw.Sockets
	l *layout
}

// New opens the netlink socket in the namespace nsFd (-1: the current).
func New(nsFd int) (*Manager, error) {
	s, err := nfraw.OpenSockets(nsFd)
	if err != nil {
		return nil, err
	}
	return &Manager{Sockets: s, l: newLayout()}, nil
}

// wantRules are the rule comments of the fixed chains and, for a code
// point, of its chain.
func (m *Manager) wantRules(dscp *uint8) map[string][]string {
	want := map[string][]string{}
	for _, r := range m.l.rules() {
		want[r.chain.Name] = append(want[r.chain.Name], ruleTag+r.comment)
	}
	if dscp != nil {
		for range dscpRules(*dscp) {
			want[dscpChain(*dscp)] = append(want[dscpChain(*dscp)], ruleTag+dscpComment(*dscp))
		}
	}
	return want
}

func dscpComment(d uint8) string { return "dscp " + itoa(int(d)) }

// EnsureBase creates or repairs the table's sets, chains and rules (one
// dump when they are in place). Existing elements are kept.
func (m *Manager) EnsureBase() (repaired bool, err error) { return m.ensure(nil) }

// ensure is EnsureBase, and also writes the chain of code point dscp
// (given) that a pod's verdict map element jumps to: one dump when all is
// in place, else one batch.
func (m *Manager) ensure(dscp *uint8) (repaired bool, err error) {
	ok, err := m.Raw.ChainsHold(m.l.table.Name, m.wantRules(dscp))
	if err != nil || ok {
		return false, err
	}
	conn, err := m.NFT()
	if err != nil {
		return false, err
	}
	conn.AddTable(m.l.table)
	for _, s := range m.l.sets {
		if err := conn.AddSet(s, nil); err != nil {
			return false, fmt.Errorf("add set %s: %w", s.Name, err)
		}
	}
	for _, c := range []*nftables.Chain{m.l.prerouting, m.l.output} {
		conn.AddChain(c)
		conn.FlushChain(c)
	}
	for _, r := range m.l.rules() {
		conn.AddRule(&nftables.Rule{Table: m.l.table, Chain: r.chain, Exprs: r.exprs, UserData: comment(r.comment)})
	}
	if dscp != nil {
		c := &nftables.Chain{Name: dscpChain(*dscp), Table: m.l.table}
		conn.AddChain(c)
		conn.FlushChain(c)
		for _, ex := range dscpRules(*dscp) {
			conn.AddRule(&nftables.Rule{Table: m.l.table, Chain: c, Exprs: ex, UserData: comment(dscpComment(*dscp))})
		}
	}
	if err := conn.Flush(); err != nil {
		return false, fmt.Errorf("create control chains in table inet %s: %w", m.l.table.Name, err)
	}
	return true, nil
}

// want is one element an attachment should hold.
type want struct {
	set string
	el  nfraw.Element
}

// desired lists the elements of c for the pod's addresses.
func desired(owner Owner, ips []net.IP, c *state.Controls) []want {
	if c.Empty() {
		return nil
	}
	tag := nfraw.EncodeOwner(owner)
	var out []want
	for _, ip := range ips {
		key, v6 := addrKey(ip)
		for k := Kind(0); k < numCounted; k++ {
			d := c.Ingress
			if k.egress() {
				d = c.Egress
			}
			if d == nil {
				continue
			}
			switch {
			case !k.connections() && d.PacketRate != 0:
				// The counter first: it counts every packet, and the
				// limit then breaks the lookup of those under the rate.
				limit := &expr.Limit{Type: expr.LimitTypePkts, Rate: d.PacketRate, Unit: expr.LimitTimeSecond, Burst: d.PacketBurst, Over: true}
				out = append(out,
					want{k.setName(v6), nfraw.Element{Key: key, Comment: tag, Exprs: []expr.Any{&expr.Counter{}, limit}}},
					want{k.dropSetName(v6), nfraw.Element{Key: key, Comment: tag, Exprs: []expr.Any{&expr.Counter{}}}})
			case k.connections() && d.MaxConnections != 0:
				stateful := &expr.Connlimit{Count: d.MaxConnections, Flags: connlimitOver}
				out = append(out, want{k.setName(v6), nfraw.Element{Key: key, Comment: tag, Exprs: []expr.Any{stateful, &expr.Counter{}}}})
			}
		}
		if c.DSCP != nil {
			out = append(out, want{dscpSet(v6), nfraw.Element{Key: key, Comment: tag, Jump: dscpChain(*c.DSCP)}})
		}
	}
	return out
}

// connlimitOver is NFT_CONNLIMIT_F_INV: match when the count is over.
const connlimitOver = 1

// Set gives the attachment exactly the controls c on its addresses, in
// one transaction: the addresses' elements in every control set are
// replaced, so a control the pod no longer has is lifted. Elements of
// another owner on these addresses are taken over: an address belongs to
// one pod at a time, and a stale element is a dead pod's.
func (m *Manager) Set(owner Owner, ips []net.IP, c *state.Controls) error {
	if !c.Empty() {
		if err := refuseFlowtables(m.Raw.Flowtables); err != nil {
			return err
		}
	}
	var dscp *uint8
	if c != nil {
		dscp = c.DSCP
	}
	if _, err := m.ensure(dscp); err != nil {
		return err
	}
	b := &nfraw.Batch{}
	for _, ip := range ips {
		key, v6 := addrKey(ip)
		for _, s := range m.l.sets {
			if (s.KeyType == nftables.TypeIP6Addr) == v6 {
				if err := b.Destroy(m.l.table.Name, s.Name, key); err != nil {
					return err
				}
			}
		}
	}
	for _, w := range desired(owner, ips, c) {
		if err := b.Add(m.l.table.Name, w.set, w.el); err != nil {
			return err
		}
	}
	if err := m.Raw.Send(b); err != nil {
		return fmt.Errorf("set controls of %s on %v: %w", owner, ips, err)
	}
	return nil
}

// refuseFlowtables fails when the node offloads flows: a flow in a
// flowtable skips the IP hooks, so its packets would escape every control.
func refuseFlowtables(list func() ([]string, error)) error {
	fts, err := list()
	if err != nil {
		return fmt.Errorf("list nftables flowtables: %w", err)
	}
	if len(fts) > 0 {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(
			"packet-rate, connection and DSCP controls cannot be enforced on this node: flows offloaded to nftables flowtable %v bypass them; remove the flowtable or the pod's controls", fts), "")
	}
	return nil
}

// Del removes the attachment's elements from its addresses, leaving an
// element another attachment holds (a later pod with the address, before
// this DEL is retried). Missing elements, sets or table are no error.
func (m *Manager) Del(owner Owner, ips []net.IP) error {
	b := &nfraw.Batch{}
	if err := queueDel(m.Raw, m.l, b, owner, ips); err != nil {
		return err
	}
	if err := m.Raw.Send(b); err != nil {
		return fmt.Errorf("remove controls of %s: %w", owner, err)
	}
	return nil
}

// queueDel puts the removal of the addresses' elements that owner holds
// into b.
func queueDel(r *nfraw.Conn, l *layout, b *nfraw.Batch, owner Owner, ips []net.IP) error {
	for _, ip := range ips {
		key, v6 := addrKey(ip)
		for _, s := range l.sets {
			if (s.KeyType == nftables.TypeIP6Addr) != v6 {
				continue
			}
			el, found, err := r.GetElem(l.table.Name, s.Name, key)
			if err != nil {
				return err
			}
			if o, ok := nfraw.DecodeOwner(el.Comment); found && ok && o.Same(owner) {
				if err := b.Destroy(l.table.Name, s.Name, key); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// Check compares the kernel with c: the base rules, and each address's
// element in every control set present (owned, same parameters) or absent
// as c says. The errors name what differs.
func (m *Manager) Check(owner Owner, ips []net.IP, c *state.Controls) error {
	if c.Empty() {
		return nil
	}
	ok, err := m.Raw.ChainsHold(m.l.table.Name, m.wantRules(c.DSCP))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("control chains of table inet %s missing or changed", m.l.table.Name)
	}
	wanted := map[string]map[string]nfraw.Element{}
	for _, w := range desired(owner, ips, c) {
		if wanted[w.set] == nil {
			wanted[w.set] = map[string]nfraw.Element{}
		}
		wanted[w.set][string(w.el.Key)] = w.el
	}
	var errs []error
	for _, ip := range ips {
		key, v6 := addrKey(ip)
		for _, s := range m.l.sets {
			if (s.KeyType == nftables.TypeIP6Addr) != v6 {
				continue
			}
			have, found, err := m.Raw.GetElem(m.l.table.Name, s.Name, key)
			if err != nil {
				return err
			}
			w, want := wanted[s.Name][string(key)]
			switch {
			case want && !found:
				errs = append(errs, fmt.Errorf("%s element for %s missing", s.Name, ip))
			case !want && found:
				errs = append(errs, fmt.Errorf("%s element for %s present but not configured", s.Name, ip))
			case want && !sameElem(have, w):
				errs = append(errs, fmt.Errorf("%s element for %s differs from the configured controls", s.Name, ip))
			}
		}
	}
	return errors.Join(errs...)
}

func sameElem(have, want nfraw.Element) bool {
	if have.Comment != want.Comment || have.Jump != want.Jump || len(have.Exprs) != len(want.Exprs) {
		return false
	}
	for i := range want.Exprs {
		switch w := want.Exprs[i].(type) {
		case *expr.Limit:
			h, ok := have.Exprs[i].(*expr.Limit)
			if !ok || h.Rate != w.Rate || h.Burst != w.Burst || h.Over != w.Over || h.Type != w.Type {
				return false
			}
		case *expr.Connlimit:
			h, ok := have.Exprs[i].(*expr.Connlimit)
			if !ok || h.Count != w.Count || h.Flags != w.Flags {
				return false
			}
		case *expr.Counter:
			if _, ok := have.Exprs[i].(*expr.Counter); !ok {
				return false
			}
		}
	}
	return true
}

// Reading is what the kernel holds for one attachment's controls: whether
// each counted control's elements are there, its counter (packets dropped
// over the packet rate, connections refused over the bound) and, for a
// packet rate, the packets it met (passed and dropped), summed over the
// pod's addresses; and whether a DSCP element is there.
type Reading struct {
	Present [numCounted]bool
	Count   [numCounted]uint64
	Offered [numCounted]uint64
	DSCP    bool
}

// Read reads the counters of the pod's elements. A control is present
// when every address has its elements.
func (m *Manager) Read(ips []net.IP) (Reading, error) {
	var out Reading
	get := func(set string, key []byte) (uint64, bool, error) {
		el, found, err := m.Raw.GetElem(m.l.table.Name, set, key)
		var n uint64
		for _, x := range el.Exprs {
			if c, ok := x.(*expr.Counter); ok {
				n += c.Packets
			}
		}
		return n, found, err
	}
	var have [numCounted]int
	dscp := 0
	for _, ip := range ips {
		key, v6 := addrKey(ip)
		for k := Kind(0); k < numCounted; k++ {
			n, found, err := get(k.setName(v6), key)
			if err != nil {
				return out, err
			}
			if !found {
				continue
			}
			if k.connections() {
				have[k]++
				out.Count[k] += n
				continue
			}
			out.Offered[k] += n
			dropped, found, err := get(k.dropSetName(v6), key)
			if err != nil {
				return out, err
			}
			if found {
				have[k]++
				out.Count[k] += dropped
			}
		}
		if _, found, err := get(dscpSet(v6), key); err != nil {
			return out, err
		} else if found {
			dscp++
		}
	}
	for k := range have {
		out.Present[k] = len(ips) > 0 && have[k] == len(ips)
	}
	out.DSCP = len(ips) > 0 && dscp == len(ips)
	return out, nil
}

// Kinds lists the counted controls.
func Kinds() []Kind {
	return []Kind{EgressPackets, IngressPackets, EgressConnections, IngressConnections}
}

// GC removes every element whose owner valid rejects, in one batch, and
// returns how many.
func (m *Manager) GC(valid func(Owner) bool) (int, error) {
	names := make([]string, len(m.l.sets))
	for i, s := range m.l.sets {
		names[i] = s.Name
	}
	n, err := m.Raw.RemoveOwned(m.l.table.Name, names, valid)
	if err != nil {
		return 0, fmt.Errorf("remove stale controls: %w", err)
	}
	return n, nil
}
