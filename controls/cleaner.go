package controls

import (
	"net"

	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
)

// Cleaner is the controls step of an attachment's teardown (the plugin's
// DEL, the agent's GC: teardown.Cleaner), and the agent's removal of
// elements whose attachment has no record at all.
type Cleaner struct {
	nsFd int
	seen nfraw.Sightings
}

// NewCleaner works in the namespace nsFd (-1 = the current one).
func NewCleaner(nsFd int) *Cleaner { return &Cleaner{nsFd: nsFd} }

// Name labels the step in logs and metrics.
func (c *Cleaner) Name() string { return "controls" }

// OwnerOf is the owner of an attachment's elements, from its record.
func OwnerOf(rec *state.Record) Owner { return nfraw.OwnerOf(rec) }

// IPsOf are the record's pod addresses (state.Record.PodAddrs), as the
// controls key on them.
func IPsOf(rec *state.Record) ([]net.IP, error) {
	addrs, err := rec.PodAddrs()
	if err != nil {
		return nil, err
	}
	out := make([]net.IP, len(addrs))
	for i, a := range addrs {
		out[i] = net.IP(a.Unmap().AsSlice())
	}
	return out, nil
}

// Del removes the elements of a stale attachment: by its addresses when
// its record lists controls, by owner when an ADD was killed before its
// full record (any element it added carries its owner).
func (c *Cleaner) Del(rec *state.Record) error {
	if !rec.Provisional && rec.Controls.Empty() {
		return nil
	}
	m, err := New(c.nsFd)
	if err != nil {
		return err
	}
	defer m.Close()
	if rec.Provisional {
		_, err = m.GC(func(o Owner) bool { return o.ContainerID != rec.ContainerID || o.IfName != rec.IfName })
		return err
	}
	ips, err := IPsOf(rec)
	if err != nil {
		return err
	}
	return m.Del(OwnerOf(rec), ips)
}

// GC removes elements whose owner has no record, once two calls in a row
// found them so.
func (c *Cleaner) GC(live []*state.Record) (int, error) {
	m, err := New(c.nsFd)
	if err != nil {
		return 0, err
	}
	defer m.Close()
	return m.GC(c.seen.Pass(live))
}

// Queue puts the removal of the record's control elements into b, to be
// sent on r in one transaction with other removals. A provisional record
// is not handled here (handled false): Del finds its elements by owner.
func (c *Cleaner) Queue(rec *state.Record, r *nfraw.Conn, b *nfraw.Batch) (after func() error, handled bool, err error) {
	if rec.Provisional {
		return nil, false, nil
	}
	if rec.Controls.Empty() {
		return nil, true, nil
	}
	ips, err := IPsOf(rec)
	if err != nil {
		return nil, true, err
	}
	return nil, true, queueDel(r, newLayout(), b, OwnerOf(rec), ips)
}
