package portmap

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/google/nftables"

	"github.com/qoscni/qoscni/internal/nfraw"
	"golang.org/x/sys/unix"
)

// Owner identifies the attachment holding a mapping; see nfraw.Owner.
type Owner = nfraw.Owner

// Manager programs hostPort mappings in one network namespace. It keeps
// two netlink sockets open; Close them.
type Manager struct {
	nsFd int
	conn *nftables.Conn
	raw  *nfraw.Conn
	l    *layout
	// localnetDir keeps the markers of where route_localnet is relied on
	// ("" = none: nothing will restore the localnet guard or reset the
	// sysctl at uninstall; for library use and tests only).
	localnetDir string
}

// Option configures a Manager.
type Option func(*Manager)

// WithLocalnetDir sets the marker directory (LocalnetDir of the network's
// state directory).
func WithLocalnetDir(dir string) Option { return func(m *Manager) { m.localnetDir = dir } }

// New opens nftables in the namespace nsFd (-1 = the current one, which is
// where the plugin runs: the node netns).
func New(nsFd int, options ...Option) (*Manager, error) {
	opts := []nftables.ConnOption{nftables.AsLasting()}
	if nsFd >= 0 {
		opts = append(opts, nftables.WithNetNSFd(nsFd))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	raw, err := nfraw.Dial(nsFd)
	if err != nil {
		c.CloseLasting()
		return nil, err
	}
	m := &Manager{nsFd: nsFd, conn: c, raw: raw, l: newLayout()}
	for _, o := range options {
		o(m)
	}
	return m, nil
}

// Close releases the netlink sockets.
func (m *Manager) Close() error {
	return errors.Join(m.conn.CloseLasting(), m.raw.Close())
}

// baseReady reports whether every chain holds exactly our rules, with one
// dump of the table's rules.
func (m *Manager) baseReady() (bool, error) {
	want := map[string][]string{}
	for _, r := range m.l.rules() {
		want[r.chain.Name] = append(want[r.chain.Name], ruleTag+r.comment)
	}
	return m.raw.ChainsHold(m.l.table.Name, want)
}

// queueBase adds table, sets, chains and rules to the pending batch,
// replacing the rules of our chains (drift or an older version). Existing
// set elements are kept.
func (m *Manager) queueBase() error {
	m.conn.AddTable(m.l.table)
	for _, s := range m.l.sets() {
		if err := m.conn.AddSet(s, nil); err != nil {
			return fmt.Errorf("add set %s: %w", s.Name, err)
		}
	}
	for _, c := range m.l.chains() {
		m.conn.AddChain(c)
		m.conn.FlushChain(c)
	}
	for _, r := range m.l.rules() {
		m.conn.AddRule(&nftables.Rule{Table: m.l.table, Chain: r.chain, Exprs: r.exprs, UserData: comment(r.comment)})
	}
	return nil
}

// ensureBase creates or repairs the fixed ruleset: one dump when it is in
// place, one batch when not.
func (m *Manager) ensureBase() error {
	ok, err := m.baseReady()
	if err != nil || ok {
		return err
	}
	if err := m.queueBase(); err != nil {
		return err
	}
	if err := m.conn.Flush(); err != nil {
		return fmt.Errorf("create hostPort chains in table inet %s: %w", m.l.table.Name, err)
	}
	return nil
}

// desired is one element an attachment should hold.
type desired struct {
	set   *nftables.Set
	key   []byte
	val   []byte // nil for the hairpin sets
	what  string // for messages
	m     *Mapping
	hairp bool
}

func (m *Manager) desiredElems(maps []Mapping) []desired { return desiredOf(m.l, maps) }

func desiredOf(l *layout, maps []Mapping) []desired {
	var out []desired
	seenPod := map[string]bool{}
	for i := range maps {
		mp := &maps[i]
		out = append(out, desired{set: l.mapFor(*mp), key: elemKey(*mp), val: elemValue(*mp),
			what: "hostPort " + mp.String(), m: mp})
		if ip := mp.PodIP.String(); !seenPod[ip] {
			seenPod[ip] = true
			out = append(out, desired{set: l.hairpinFor(mp.PodIP), key: hairpinKey(mp.PodIP),
				what: "hairpin for " + ip, hairp: true})
		}
	}
	return out
}

// state of one desired element in the kernel.
type elemState int

const (
	elemMissing elemState = iota
	elemOK                // present, ours, right target
	elemStale             // present, ours, wrong target or owner tag
	elemOrphan            // hairpin element tagged for another attachment
	elemForeign           // present, another attachment's
)

type observed struct {
	desired
	state   elemState
	owner   Owner
	have    []byte // the element's data in the kernel
	valDiff bool   // ours, but the target differs
}

// compare looks up each desired element by its exact key. It is the one
// comparison routine behind ADD (what to write), DEL (what is ours to
// remove) and CHECK (what differs).
func (m *Manager) compare(owner Owner, want []desired) ([]observed, error) {
	return compareOn(m.raw, m.l, owner, want)
}

// compareOn looks each wanted element up on r.
func compareOn(r *nfraw.Conn, l *layout, owner Owner, want []desired) ([]observed, error) {
	out := make([]observed, 0, len(want))
	for _, d := range want {
		el, found, err := r.GetElem(l.table.Name, d.set.Name, d.key)
		if err != nil {
			return nil, err
		}
		o := observed{desired: d, have: el.Val}
		switch {
		case !found:
			o.state = elemMissing
		default:
			got, parsed := nfraw.DecodeOwner(el.Comment)
			o.owner = got
			switch {
			case parsed && got.Same(owner):
				o.valDiff = !d.hairp && !bytes.Equal(el.Val, d.val)
				o.state = elemOK
				if o.valDiff || el.Comment != nfraw.EncodeOwner(owner) {
					o.state = elemStale
				}
			case d.hairp:
				// A hairpin element is keyed by the pod address alone; one
				// left by a dead attachment with a reused address is ours now.
				o.state = elemOrphan
			default:
				o.state = elemForeign
			}
		}
		out = append(out, o)
	}
	return out, nil
}

func conflictError(o observed) error {
	return types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("hostPort %s is already mapped by %s", o.m.String(), o.owner),
		fmt.Sprintf("set %s of table inet qoscni", o.set.Name))
}

// Add installs the attachment's mappings in one batch. A hostPort/protocol/
// hostIP held by another attachment is refused (CNI error 7 naming the port
// and the owner) and nothing is changed; the attachment re-adding its own
// mappings is a no-op. hostIface is the host interface the pods sit behind
// (the bridge in standalone mode, the host veth or bridge in chained mode):
// it gets route_localnet=1 so 127.0.0.1:hostPort works, behind the
// localnet guard (see ensureLocalnet); "" skips that. UDP conntrack
// entries towards the mapped host ports are flushed afterwards.
func (m *Manager) Add(owner Owner, hostIface string, maps []Mapping) error {
	if len(maps) == 0 {
		return nil
	}
	if err := m.ensureBase(); err != nil {
		return err
	}
	want := m.desiredElems(maps)
	for attempt := 0; ; attempt++ {
		obs, err := m.compare(owner, want)
		if err != nil {
			return err
		}
		var b batch
		for _, o := range obs {
			switch o.state {
			case elemForeign:
				return conflictError(o)
			case elemStale, elemOrphan:
				b.del(o.set, nftables.SetElement{Key: o.key})
				fallthrough
			case elemMissing:
				b.add(o.set, nftables.SetElement{Key: o.key, Val: o.desired.val, Comment: nfraw.EncodeOwner(owner)})
			}
		}
		n, err := b.queue(m.conn)
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		err = m.conn.Flush()
		if err == nil {
			break
		}
		// Another ADD or DEL changed one of our keys between the lookup and
		// the batch (the batch is all or nothing): look again, once, so a
		// conflict is reported with its owner.
		if attempt == 0 && (errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOENT)) {
			continue
		}
		return fmt.Errorf("add hostPorts %s for %s: %w", mappingList(maps), owner, err)
	}
	if hostIface != "" && NeedsLocalnet(maps) {
		if err := m.ensureLocalnet(hostIface); err != nil {
			return err
		}
	}
	return m.flushConntrack(maps)
}

// NeedsLocalnet reports whether the mappings make the host interface
// need route_localnet (and its guards): IPv4 only, IPv6 has no such knob.
func NeedsLocalnet(maps []Mapping) bool {
	for _, mp := range maps {
		if !mp.IPv6() {
			return true
		}
	}
	return false
}

func mappingList(maps []Mapping) string {
	const show = 3
	var s []string
	for i, mp := range maps {
		if i == show {
			s = append(s, fmt.Sprintf("and %d more", len(maps)-show))
			break
		}
		s = append(s, mp.String())
	}
	return strings.Join(s, ", ")
}

// batch groups element changes into one message per set and operation:
// one message per element would overflow the socket with acks at a few
// hundred mappings (ENOBUFS), and fewer messages is less work anyway.
// Deletions are queued before additions, so a stale element is replaced.
type batch struct {
	order      []*nftables.Set
	dels, adds map[*nftables.Set][]nftables.SetElement
}

func (b *batch) note(s *nftables.Set) {
	if b.dels == nil {
		b.dels, b.adds = map[*nftables.Set][]nftables.SetElement{}, map[*nftables.Set][]nftables.SetElement{}
	}
	if _, ok := b.dels[s]; !ok {
		if _, ok := b.adds[s]; !ok {
			b.order = append(b.order, s)
		}
	}
}

func (b *batch) del(s *nftables.Set, e nftables.SetElement) {
	b.note(s)
	b.dels[s] = append(b.dels[s], e)
}

func (b *batch) add(s *nftables.Set, e nftables.SetElement) {
	b.note(s)
	b.adds[s] = append(b.adds[s], e)
}

// elemsPerMsg bounds one message's element list, a single netlink attribute
// whose length is 16 bits: an element with its owner comment takes < 300
// bytes.
const elemsPerMsg = 200

// queue appends the changes to the connection's pending batch (still one
// transaction) and returns how many elements it touches.
func (b *batch) queue(c *nftables.Conn) (int, error) {
	n := 0
	for _, op := range []struct {
		m    map[*nftables.Set][]nftables.SetElement
		fn   func(*nftables.Set, []nftables.SetElement) error
		verb string
	}{{b.dels, c.SetDeleteElements, "removal from"}, {b.adds, c.SetAddElements, "addition to"}} {
		for _, s := range b.order {
			for els := op.m[s]; len(els) > 0; {
				k := min(len(els), elemsPerMsg)
				if err := op.fn(s, els[:k]); err != nil {
					return 0, fmt.Errorf("queue %s set %s: %w", op.verb, s.Name, err)
				}
				n += k
				els = els[k:]
			}
		}
	}
	return n, nil
}

// Del removes the attachment's elements (only those it owns) in one batch
// and flushes UDP conntrack entries towards the host ports. Missing
// elements, sets or table are not an error, so DEL is idempotent.
func (m *Manager) Del(owner Owner, maps []Mapping) error {
	if len(maps) == 0 {
		return nil
	}
	want := m.desiredElems(maps)
	for attempt := 0; ; attempt++ {
		obs, err := m.compare(owner, want)
		if err != nil {
			return err
		}
		var b batch
		for _, o := range obs {
			if o.state == elemOK || o.state == elemStale {
				b.del(o.set, nftables.SetElement{Key: o.key})
			}
		}
		n, err := b.queue(m.conn)
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		err = m.conn.Flush()
		if err == nil {
			break
		}
		if attempt == 0 && errors.Is(err, unix.ENOENT) {
			continue
		}
		return fmt.Errorf("remove hostPorts %s of %s: %w", mappingList(maps), owner, err)
	}
	return m.flushConntrack(maps)
}

// Check reports every difference between the attachment's mappings and the
// kernel: base rules, and each element present, owned by the attachment and
// pointing at the pod.
func (m *Manager) Check(owner Owner, maps []Mapping) error {
	if len(maps) == 0 {
		return nil
	}
	ok, err := m.baseReady()
	if err != nil {
		return err
	}
	var problems []string
	if !ok {
		problems = append(problems, fmt.Sprintf("hostPort rules of table inet %s are missing or modified", m.l.table.Name))
	}
	obs, err := m.compare(owner, m.desiredElems(maps))
	if err != nil {
		return err
	}
	for _, o := range obs {
		switch o.state {
		case elemMissing:
			problems = append(problems, o.what+" is missing")
		case elemForeign:
			problems = append(problems, fmt.Sprintf("%s is held by %s", o.what, o.owner))
		case elemOrphan:
			problems = append(problems, fmt.Sprintf("%s is tagged for %s", o.what, o.owner))
		case elemStale:
			if o.valDiff {
				problems = append(problems, fmt.Sprintf("%s points at %s, want %s", o.what,
					targetString(o.m.IPv6(), o.have), net.JoinHostPort(o.m.PodIP.String(), fmt.Sprint(o.m.ContainerPort))))
			}
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("check hostPorts of %s: %s", owner, strings.Join(problems, "; "))
	}
	return nil
}

func targetString(v6 bool, val []byte) string {
	alen := 4
	if v6 {
		alen = 16
	}
	if len(val) < alen+2 {
		return fmt.Sprintf("%x", val)
	}
	port := int(val[alen])<<8 | int(val[alen+1])
	return net.JoinHostPort(net.IP(val[:alen]).String(), fmt.Sprint(port))
}

// GC removes the elements of attachments for which valid returns false (and
// elements without a readable owner: the table is ours), in one batch, and
// flushes UDP conntrack entries towards their host ports. It lists every
// element, which is fine for a periodic sweep.
func (m *Manager) GC(valid func(Owner) bool) (int, error) {
	for attempt := 0; ; attempt++ {
		var gone []Mapping
		var b batch
		for _, s := range m.l.sets() {
			els, err := m.raw.DumpElems(m.l.table.Name, s.Name)
			if err != nil {
				return 0, err
			}
			for _, el := range els {
				if o, ok := nfraw.DecodeOwner(el.Comment); ok && valid(o) {
					continue
				}
				b.del(s, nftables.SetElement{Key: el.Key})
				if mp, ok := mappingOf(s, el.Key); ok {
					gone = append(gone, mp)
				}
			}
		}
		n, err := b.queue(m.conn)
		if err != nil || n == 0 {
			return 0, err
		}
		err = m.conn.Flush()
		if err == nil {
			return n, m.flushConntrack(gone)
		}
		if attempt == 0 && errors.Is(err, unix.ENOENT) {
			continue
		}
		return 0, fmt.Errorf("remove %d stale hostPort elements: %w", n, err)
	}
}

// mappingOf decodes a map element back into the host side of a mapping
// (enough for the conntrack flush).
func mappingOf(s *nftables.Set, k []byte) (Mapping, bool) {
	var mp Mapping
	switch s.Name {
	case setAny4, setAny6:
	case setHostIP4:
		if len(k) < 4 {
			return mp, false
		}
		mp.HostIP, k = net.IP(k[:4]), k[4:]
	case setHostIP6:
		if len(k) < 16 {
			return mp, false
		}
		mp.HostIP, k = net.IP(k[:16]), k[16:]
	default:
		return mp, false
	}
	if len(k) < 8 {
		return mp, false
	}
	switch k[0] {
	case 6:
		mp.Protocol = "tcp"
	case 17:
		mp.Protocol = "udp"
	case 132:
		mp.Protocol = "sctp"
	}
	mp.HostPort = uint16(k[4])<<8 | uint16(k[5])
	if s.Name == setAny6 || s.Name == setHostIP6 {
		mp.PodIP = net.IPv6unspecified
	} else {
		mp.PodIP = net.IPv4zero.To4()
	}
	return mp, true
}

// Count returns the number of elements held in the hostPort maps and
// hairpin sets (0 when the table does not exist).
func (m *Manager) Count() (int, error) {
	n := 0
	for _, s := range m.l.sets() {
		els, err := m.raw.DumpElems(m.l.table.Name, s.Name)
		if err != nil {
			return 0, err
		}
		n += len(els)
	}
	return n, nil
}

// Uninstall deletes the whole qoscni table (hostPorts and ipMasq alike).
// A missing table is not an error.
func Uninstall(nsFd int) error {
	var opts []nftables.ConnOption
	if nsFd >= 0 {
		opts = append(opts, nftables.WithNetNSFd(nsFd))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	t := newLayout().table
	c.DelTable(t)
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete table inet %s: %w", t.Name, err)
	}
	return nil
}
