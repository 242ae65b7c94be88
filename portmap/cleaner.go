package portmap

import (
	"fmt"

	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
)

// Cleaner is the hostPort step of an attachment's teardown (the plugin's
// DEL, the node agent's GC: teardown.Cleaner), and the agent's removal of
// elements whose attachment has no record at all (GC).
type Cleaner struct {
	nsFd int
	seen nfraw.Sightings
}

// NewCleaner works in the namespace nsFd (-1 = the current one).
func NewCleaner(nsFd int) *Cleaner { return &Cleaner{nsFd: nsFd} }

// Name labels the step in logs and metrics.
func (c *Cleaner) Name() string { return "hostport" }

// Del removes the elements a stale attachment's record lists.
func (c *Cleaner) Del(rec *state.Record) error {
	if rec.Provisional {
		// An ADD killed before its full record: any element it added
		// carries its owner.
		m, err := New(c.nsFd)
		if err != nil {
			return err
		}
		defer m.Close()
		_, err = m.GC(func(o Owner) bool { return o.ContainerID != rec.ContainerID || o.IfName != rec.IfName })
		return err
	}
	if len(rec.Ports) == 0 {
		return nil
	}
	maps, err := FromState(rec.Ports)
	if err != nil {
		return fmt.Errorf("hostPorts of %s/%s: %w", rec.ContainerID, rec.IfName, err)
	}
	m, err := New(c.nsFd)
	if err != nil {
		return err
	}
	defer m.Close()
	return m.Del(OwnerOf(rec), maps)
}

// OwnerOf is the owner of an attachment's elements, from its record.
func OwnerOf(rec *state.Record) Owner { return nfraw.OwnerOf(rec) }

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

// Queue puts the removal of the elements the record lists, and that the
// attachment still owns, into b, to be sent on r in one transaction with
// other removals; after runs once it was sent (the UDP conntrack flush).
// A provisional record is not handled here (handled false): Del finds its
// elements by owner.
func (c *Cleaner) Queue(rec *state.Record, r *nfraw.Conn, b *nfraw.Batch) (after func() error, handled bool, err error) {
	if rec.Provisional {
		return nil, false, nil
	}
	if len(rec.Ports) == 0 {
		return nil, true, nil
	}
	maps, err := FromState(rec.Ports)
	if err != nil {
		return nil, true, fmt.Errorf("hostPorts of %s/%s: %w", rec.ContainerID, rec.IfName, err)
	}
	l := newLayout()
	obs, err := compareOn(r, l, OwnerOf(rec), desiredOf(l, maps))
	if err != nil {
		return nil, true, err
	}
	for _, o := range obs {
		if o.state == elemOK || o.state == elemStale {
			if err := b.Delete(l.table.Name, o.set.Name, o.key); err != nil {
				return nil, true, err
			}
		}
	}
	return func() error { return (&Manager{nsFd: c.nsFd}).flushConntrack(maps) }, true, nil
}
