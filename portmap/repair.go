package portmap

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"slices"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
)

// Kinds of what Repairer restores (qoscni_agent_repairs_total{kind}).
const (
	// RepairBase: table inet qoscni's hostPort chains and rules (the
	// martian chain among them) were rebuilt, in one batch.
	RepairBase = "nftables-base"
	// RepairHostPort: a hostPort map or hairpin set element was restored.
	RepairHostPort = "hostport"
	// RepairGuard: a localnet guard was put back on its interface.
	RepairGuard = "localnet-guard"
)

// attachment is one record's share of the hostPort elements.
type attachment struct {
	owner Owner
	maps  []Mapping
}

// repairResult is what one repair batch restored.
type repairResult struct {
	base      bool
	elems     int
	conflicts []string // a record's key held by another attachment
}

// repair makes the kernel hold the base ruleset (when any attachment has
// mappings, or needBase) and every element of atts, in one batch. It
// looks each element up with compare, as ADD and CHECK do, and writes
// missing and stale ones only: an element held by another attachment is
// reported, never taken, and elements of attachments not in atts are
// GC's business.
func (m *Manager) repair(atts []attachment, needBase bool) (repairResult, error) {
	for attempt := 0; ; attempt++ {
		var res repairResult
		ready, err := m.baseReady()
		if err != nil {
			return res, err
		}
		var b batch
		for _, a := range atts {
			obs, err := m.compare(a.owner, m.desiredElems(a.maps))
			if err != nil {
				return res, err
			}
			for _, o := range obs {
				switch o.state {
				case elemStale:
					b.del(o.set, nftables.SetElement{Key: o.key})
					fallthrough
				case elemMissing:
					b.add(o.set, nftables.SetElement{Key: o.key, Val: o.desired.val, Comment: nfraw.EncodeOwner(a.owner)})
					res.elems++
				case elemForeign:
					res.conflicts = append(res.conflicts, fmt.Sprintf("%s of %s is held by %s", o.what, a.owner, o.owner))
				}
			}
		}
		if !ready && (needBase || len(atts) > 0) {
			if err := m.queueBase(); err != nil {
				return res, err
			}
			res.base = true
		}
		n, err := b.queue(m.conn)
		if err != nil {
			return res, err
		}
		if !res.base && n == 0 {
			return res, nil
		}
		err = m.conn.Flush()
		if err == nil {
			return res, nil
		}
		// An ADD or DEL changed a key since the lookup: look again, once.
		if attempt == 0 && (errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOENT)) {
			continue
		}
		return repairResult{}, fmt.Errorf("restore hostPort rules and %d elements in table inet %s: %w", res.elems, m.l.table.Name, err)
	}
}

// Repairer is the node agent's drift repair of what portmap keeps in the
// kernel (reconcile.KernelRepairer): the localnet guards, then the
// hostPort ruleset with its martian chain and every map and hairpin
// element the records' ports call for. An `nft flush ruleset` (Debian's
// nftables.service runs one at start and reload) takes the table away;
// the next pass brings it back.
type Repairer struct {
	nsFd int
	dirs []string
	log  *slog.Logger
	// reported are the conflicts logged already, so one is logged once.
	reported []string
}

// NewRepairer works in the namespace nsFd (-1 = the current one) and
// restores the guards that the markers in localnetDirs name.
func NewRepairer(nsFd int, localnetDirs []string, log *slog.Logger) *Repairer {
	if log == nil {
		log = slog.Default()
	}
	return &Repairer{nsFd: nsFd, dirs: localnetDirs, log: log}
}

// Name labels the step in logs.
func (r *Repairer) Name() string { return "hostport" }

// Kinds are the repair kinds Repair reports.
func (r *Repairer) Kinds() []string { return []string{RepairBase, RepairHostPort, RepairGuard} }

// Repair restores what live (complete records only) needs, and returns
// how many objects of each kind it restored. The markers are read from
// the localnet directory of every state directory of the pass, besides
// the ones the Repairer was made with.
func (r *Repairer) Repair(live []*state.Record, stateDirs []string) (map[string]int, error) {
	out := map[string]int{}
	var errs []error
	dirs := slices.Clone(r.dirs)
	for _, d := range stateDirs {
		if l := LocalnetDir(d); !slices.Contains(dirs, l) {
			dirs = append(dirs, l)
		}
	}
	g, err := repairGuards(r.nsFd, dirs)
	if err != nil {
		errs = append(errs, fmt.Errorf("localnet guards: %w", err))
	}
	if len(g.restored) > 0 {
		out[RepairGuard] = len(g.restored)
		r.log.Warn("restored the localnet guard (tc) of route_localnet", "interfaces", g.restored)
	}
	if len(g.dropped) > 0 {
		r.log.Info("dropped localnet markers of interfaces gone since (or of an earlier boot)", "markers", g.dropped)
	}
	var atts []attachment
	for _, rec := range live {
		if rec.Provisional || len(rec.Ports) == 0 {
			continue
		}
		maps, err := FromState(rec.Ports)
		if err != nil {
			errs = append(errs, fmt.Errorf("hostPorts of %s/%s: %w", rec.ContainerID, rec.IfName, err))
			continue
		}
		atts = append(atts, attachment{owner: OwnerOf(rec), maps: maps})
	}
	if len(atts) == 0 && g.marked == 0 {
		return out, errors.Join(errs...)
	}
	m, err := New(r.nsFd)
	if err != nil {
		return out, errors.Join(append(errs, err)...)
	}
	defer m.Close()
	// The martian chain is wanted wherever route_localnet is relied on,
	// also when no pod maps a port any more.
	res, err := m.repair(atts, g.marked > 0)
	if err != nil {
		errs = append(errs, err)
	}
	if res.base {
		out[RepairBase]++
		r.log.Warn("restored the hostPort rules of table inet "+m.l.table.Name+" (martian guard, DNAT, hairpin)", "attachments", len(atts))
	}
	if res.elems > 0 {
		out[RepairHostPort] += res.elems
		r.log.Warn("restored hostPort elements from the state records", "elements", res.elems, "attachments", len(atts))
	}
	slices.Sort(res.conflicts)
	if !slices.Equal(res.conflicts, r.reported) {
		for _, c := range res.conflicts {
			if !slices.Contains(r.reported, c) {
				r.log.Warn("hostPort not restored: another attachment holds it now", "conflict", c)
			}
		}
		r.reported = res.conflicts
	}
	return out, errors.Join(errs...)
}

// guardRepair is what repairGuards did.
type guardRepair struct {
	marked   int      // interfaces with a valid marker
	restored []string // interfaces whose guard was put back
	dropped  []string // markers removed: their interface or boot is gone
}

// repairGuards puts the localnet guard back on every interface a valid
// marker names, and removes the markers that describe nothing any more.
func repairGuards(nsFd int, dirs []string) (guardRepair, error) {
	var res guardRepair
	boot, err := bootID()
	if err != nil {
		return res, err
	}
	var h *netlink.Handle
	var c *tcConn
	defer func() {
		if h != nil {
			h.Close()
		}
		if c != nil {
			c.Close()
		}
	}()
	var errs []error
	for _, dir := range dirs {
		markers, bad, err := readMarkers(dir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, p := range bad {
			if err := os.Remove(p); err == nil {
				res.dropped = append(res.dropped, p)
			}
		}
		for _, mk := range markers {
			if h == nil {
				if h, err = linkHandle(nsFd); err != nil {
					return res, err
				}
				if c, err = openTC(nsFd); err != nil {
					return res, err
				}
			}
			idx, err := guardable(h, mk.IfName)
			if mk.BootID != boot || err != nil || idx != mk.IfIndex {
				var nf netlink.LinkNotFoundError
				if mk.BootID == boot && err != nil && !errors.As(err, &nf) {
					errs = append(errs, err)
					continue
				}
				if err := os.Remove(markerPath(dir, mk.IfName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errs = append(errs, fmt.Errorf("remove stale localnet marker: %w", err))
				}
				res.dropped = append(res.dropped, mk.IfName)
				continue
			}
			res.marked++
			changed, created, err := installGuard(c, mk.IfName, uint32(idx))
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if created && !mk.CreatedClsact {
				mk.CreatedClsact = true
				if err := writeMarker(dir, mk, false); err != nil {
					errs = append(errs, err)
				}
			}
			if changed {
				res.restored = append(res.restored, mk.IfName)
			}
		}
	}
	return res, errors.Join(errs...)
}
