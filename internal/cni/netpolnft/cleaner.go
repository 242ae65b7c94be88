package netpolnft

import (
	"fmt"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
)

// Cleaner is the pending step of an attachment's teardown (the plugin's
// DEL, the agent's GC: teardown.Cleaner and Queuer), and the agent's
// removal of pending elements whose attachment has no record at all.
type Cleaner struct {
	nsFd int
	seen nfraw.Sightings
}

// NewCleaner works in the namespace nsFd (-1 = the current one).
func NewCleaner(nsFd int) *Cleaner { return &Cleaner{nsFd: nsFd} }

// Name labels the step in logs and metrics.
func (c *Cleaner) Name() string { return "netpol" }

// Del removes the attachment's pending elements: by its addresses, or
// by owner when an ADD was killed before its full record.
func (c *Cleaner) Del(rec *state.Record) error {
	m, err := New(c.nsFd)
	if err != nil {
		return err
	}
	defer m.Close()
	owner := nfraw.OwnerOf(rec)
	if rec.Provisional {
		_, err = m.GC(func(o Owner) bool { return !o.Same(owner) })
		return err
	}
	addrs, err := rec.PodAddrs()
	if err != nil {
		return err
	}
	return m.Unpend(owner, addrs)
}

// Queue puts the removal of the record's pending elements into b, to be
// sent on r in one transaction with other removals. A provisional record
// is not handled here (handled false): Del finds its elements by owner.
func (c *Cleaner) Queue(rec *state.Record, r *nfraw.Conn, b *nfraw.Batch) (after func() error, handled bool, err error) {
	if rec.Provisional {
		return nil, false, nil
	}
	addrs, err := rec.PodAddrs()
	if err != nil {
		return nil, true, err
	}
	return nil, true, queueUnpend(r, podnet.TableName, b, nfraw.OwnerOf(rec), addrs)
}

// GC removes pending elements whose owner has no record, once two calls
// in a row found them so (an ADD writes them before its record).
func (c *Cleaner) GC(live []*state.Record) (int, error) {
	m, err := New(c.nsFd)
	if err != nil {
		return 0, err
	}
	defer m.Close()
	return m.GC(c.seen.Pass(live))
}

// GC removes the pending elements whose owner valid refuses.
func (m *Manager) GC(valid func(Owner) bool) (int, error) {
	n, err := m.Raw.RemoveOwned(m.l.table.Name, []string{name(setPending, false), name(setPending, true)}, valid)
	if err != nil {
		return 0, fmt.Errorf("remove stale pending elements: %w", err)
	}
	return n, nil
}
