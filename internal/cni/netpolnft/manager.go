package netpolnft

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/qoscni/qoscni/internal/fault"
	"github.com/qoscni/qoscni/internal/nfraw"
)

// Owner is the attachment a pending element belongs to; see nfraw.Owner.
type Owner = nfraw.Owner

// Manager programs the policy sets and chains in one network namespace;
// Close it.
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

// HasBase says the table holds the policy chains (some of them): this
// node enforced policy once.
func (m *Manager) HasBase() (bool, error) {
	have, err := m.Raw.RuleComments(m.l.table.Name)
	if err != nil {
		return false, err
	}
	return len(have[chainForward]) > 0, nil
}

// EnsureBase creates or repairs the sets, chains and rules (one dump of
// the table's rules when they are in place). Existing elements are kept:
// a repaired chain finds its sets as they were.
func (m *Manager) EnsureBase() (repaired bool, err error) {
	have, err := m.Raw.RuleComments(m.l.table.Name)
	if err != nil {
		return false, err
	}
	return m.ensureBase(have)
}

// ensureBase is EnsureBase given the table's rule comments as they are.
func (m *Manager) ensureBase(have map[string][]string) (repaired bool, err error) {
	if nfraw.CommentsHold(have, m.l.wantRules()) {
		return false, nil
	}
	conn, err := m.NFT()
	if err != nil {
		return false, err
	}
	conn.AddTable(m.l.table)
	ids := map[string]uint32{}
	for _, s := range m.l.sets {
		if err := conn.AddSet(s, nil); err != nil {
			return false, fmt.Errorf("add set %s: %w", s.Name, err)
		}
		ids[s.Name] = s.ID
	}
	chains := map[string]*nftables.Chain{}
	// Regular chains first: the base chains jump to them.
	for _, c := range append(slices.Clone(m.l.chains), m.l.forward, m.l.input) {
		conn.AddChain(c)
		conn.FlushChain(c)
		chains[c.Name] = c
	}
	for _, r := range m.l.rules() {
		for _, e := range r.exprs {
			if lk, ok := e.(*expr.Lookup); ok {
				lk.SetID = ids[lk.SetName]
			}
		}
		conn.AddRule(&nftables.Rule{Table: m.l.table, Chain: chains[r.chain], Exprs: r.exprs, UserData: comment(r.comment)})
	}
	if err := conn.Flush(); err != nil {
		return false, fmt.Errorf("create NetworkPolicy chains in table inet %s: %w", m.l.table.Name, err)
	}
	return true, nil
}

func addrKey(a netip.Addr) (key []byte, v6 bool) {
	a = a.Unmap()
	return a.AsSlice(), a.Is6()
}

// Pend closes the attachment's addresses both ways until the agent has
// written their policy (Apply), in one transaction, after making sure
// the chains are there. A pending element of another owner on one of
// these addresses is a dead attachment's and is taken over.
func (m *Manager) Pend(owner Owner, addrs []netip.Addr) error {
	if _, err := m.EnsureBase(); err != nil {
		return err
	}
	b := &nfraw.Batch{}
	tag := nfraw.EncodeOwner(owner)
	for _, a := range addrs {
		key, v6 := addrKey(a)
		s := name(setPending, v6)
		if err := b.Destroy(m.l.table.Name, s, key); err != nil {
			return err
		}
		if err := b.Add(m.l.table.Name, s, nfraw.Element{Key: key, Comment: tag}); err != nil {
			return err
		}
	}
	if err := m.Raw.Send(b); err != nil {
		return fmt.Errorf("close %s until its NetworkPolicy is in place: %w", owner, err)
	}
	return nil
}

// Unpend takes the attachment's own pending elements off its addresses
// (ADD's rollback; DEL queues the same through the Cleaner).
func (m *Manager) Unpend(owner Owner, addrs []netip.Addr) error {
	b := &nfraw.Batch{}
	if err := m.queueUnpend(b, owner, addrs); err != nil {
		return err
	}
	return m.Raw.Send(b)
}

// queueUnpend queues the removal of owner's pending elements of addrs:
// one exact-key lookup each; another owner's element stays.
func (m *Manager) queueUnpend(b *nfraw.Batch, owner Owner, addrs []netip.Addr) error {
	return queueUnpend(m.Raw, m.l.table.Name, b, owner, addrs)
}

func queueUnpend(r *nfraw.Conn, table string, b *nfraw.Batch, owner Owner, addrs []netip.Addr) error {
	for _, a := range addrs {
		key, v6 := addrKey(a)
		s := name(setPending, v6)
		el, found, err := r.GetElem(table, s, key)
		if err != nil {
			return err
		}
		if !found {
			continue
		}
		if o, ok := nfraw.DecodeOwner(el.Comment); !ok || !o.Same(owner) {
			continue
		}
		if err := b.Delete(table, s, key); err != nil {
			return err
		}
	}
	return nil
}

// Pending lists the pending addresses with their owners.
func (m *Manager) Pending() (map[netip.Addr]Owner, error) {
	out := map[netip.Addr]Owner{}
	for _, v6 := range []bool{false, true} {
		els, err := m.Raw.DumpElems(m.l.table.Name, name(setPending, v6))
		if err != nil {
			return nil, err
		}
		for _, el := range els {
			a, ok := netip.AddrFromSlice(el.Key)
			if !ok {
				continue
			}
			o, _ := nfraw.DecodeOwner(el.Comment)
			out[a] = o
		}
	}
	return out, nil
}

// Apply makes the policy sets and identity chains hold exactly want, and
// takes the addresses of want.Ready out of the pending set, in one
// transaction: a pod is never seen by packets half way between two
// policies. It reads the sets and rules first and sends only the
// difference. Pending elements of addresses not in want.Ready, or of
// another owner than want.Ready names, stay (their pods are not known
// yet).
func (m *Manager) Apply(want *State) (changed int, err error) {
	t := m.l.table
	// One dump for both: the fixed chains' check, and the identity
	// chains (a repair of the fixed ones leaves those as they are).
	have, err := m.Raw.RuleComments(t.Name)
	if err != nil {
		return 0, err
	}
	if _, err := m.ensureBase(have); err != nil {
		return 0, err
	}
	conn, err := m.NFT()
	if err != nil {
		return 0, err
	}
	// Identity chains first: the maps' elements go to them.
	wanted := map[string]bool{}
	for _, id := range want.identities() {
		for _, egress := range []bool{false, true} {
			rules := identRules(id, egress)
			c := &nftables.Chain{Name: identChain(id, egress), Table: t}
			wanted[c.Name] = true
			var comments []string
			for _, r := range rules {
				comments = append(comments, ruleTag+r.comment)
			}
			if slices.Equal(have[c.Name], comments) {
				continue
			}
			conn.AddChain(c)
			conn.FlushChain(c)
			for _, r := range rules {
				conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: r.exprs, UserData: comment(r.comment)})
			}
			changed++
		}
	}
	for _, v6 := range []bool{false, true} {
		for _, kind := range allowanceKinds {
			s := m.l.set(name(kind, v6))
			have, err := m.Raw.DumpElems(t.Name, s.Name)
			if err != nil {
				return 0, err
			}
			del, add := diff(have, want.elements(kind, v6))
			// A message's element list is one netlink attribute, at most
			// 64 KiB: a few hundred elements per message.
			for c := range slices.Chunk(del, elemsPerMsg) {
				if err := conn.SetDeleteElements(s, toSetElements(c, false)); err != nil {
					return 0, err
				}
			}
			for c := range slices.Chunk(add, elemsPerMsg) {
				if err := conn.SetAddElements(s, toSetElements(c, s.IsMap)); err != nil {
					return 0, err
				}
			}
			changed += len(del) + len(add)
		}
		s := m.l.set(name(setPending, v6))
		pending, err := m.Raw.DumpElems(t.Name, s.Name)
		if err != nil {
			return 0, err
		}
		var ready []nftables.SetElement
		for _, el := range pending {
			a, ok := netip.AddrFromSlice(el.Key)
			if !ok {
				continue
			}
			owner, isReady := want.Ready[a]
			if o, tagged := nfraw.DecodeOwner(el.Comment); isReady && tagged && o.Same(owner) {
				ready = append(ready, nftables.SetElement{Key: el.Key})
			}
		}
		if len(ready) > 0 {
			if err := conn.SetDeleteElements(s, ready); err != nil {
				return 0, err
			}
			changed += len(ready)
		}
	}
	// Chains of identities gone, once nothing goes to them.
	for c := range have {
		if isIdentChain(c) && !wanted[c] {
			conn.DelChain(&nftables.Chain{Name: c, Table: t})
			changed++
		}
	}
	if changed == 0 {
		return 0, nil
	}
	// The reliability of an update rests on this one transaction: an
	// agent killed before it leaves the previous state whole, one killed
	// after it the new one (netpol.TestAgentKilledMidUpdate).
	fault.At("netpol", "send")
	if err := conn.Flush(); err != nil {
		return 0, fmt.Errorf("write NetworkPolicy elements: %w", err)
	}
	fault.At("netpol", "sent")
	return changed, nil
}

// elemsPerMsg: the largest element (an IPv6 range allowance, key and
// key end of 40 bytes each, in their nests) takes about 110 bytes.
const elemsPerMsg = 256

func isIdentChain(c string) bool {
	return strings.HasPrefix(c, "np-in-") || strings.HasPrefix(c, "np-out-")
}

func toSetElements(els []nfraw.Element, vmap bool) []nftables.SetElement {
	out := make([]nftables.SetElement, len(els))
	for i, el := range els {
		out[i] = nftables.SetElement{Key: el.Key, KeyEnd: el.KeyEnd, Val: el.Val}
		if vmap && el.Jump != "" {
			out[i].VerdictData = &expr.Verdict{Kind: expr.VerdictGoto, Chain: el.Jump}
		}
	}
	return out
}

// elemKey identifies an element by what the kernel matches on.
func elemKey(el nfraw.Element) string { return string(el.Key) + "\x00" + string(el.KeyEnd) }

// diff is what turns have into want: removals of what is not wanted (or
// wanted with other data), additions of what is missing.
func diff(have, want []nfraw.Element) (del, add []nfraw.Element) {
	wanted := make(map[string]nfraw.Element, len(want))
	for _, el := range want {
		wanted[elemKey(el)] = el
	}
	present := make(map[string]bool, len(have))
	for _, el := range have {
		k := elemKey(el)
		w, ok := wanted[k]
		if ok && bytes.Equal(w.Val, el.Val) && w.Jump == el.Jump {
			present[k] = true
			continue
		}
		del = append(del, el)
	}
	for _, el := range want {
		if !present[elemKey(el)] {
			add = append(add, el)
		}
	}
	return del, add
}
