package shaping

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/qoscni/qoscni/internal/flock"
	"github.com/qoscni/qoscni/internal/state"
)

// Repair kinds of the node hierarchy (qoscni_agent_repairs_total{kind}).
const (
	// RepairHierarchy: the IFBs, the capacity, the best-effort share or
	// the hash tables.
	RepairHierarchy = "hierarchy"
	// RepairHierarchyMember: a pod's class, entries or redirects.
	RepairHierarchyMember = "hierarchy_member"
	// RepairHierarchyGC: a class no record claims, removed.
	RepairHierarchyGC = "hierarchy_gc"
)

// HierarchyLockTimeout bounds the wait for the node hierarchy's lock.
const HierarchyLockTimeout = 30 * time.Second

// LockHierarchy takes the node hierarchy's lock file (paths.HierarchyLockOf),
// which every plugin call and the agent hold around admission, a class
// minor and any change to the hierarchy; "" takes none (a test's own
// node). Unlock on the nil lock does nothing.
func LockHierarchy(path string) (*flock.Lock, error) {
	if path == "" {
		return nil, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("lock the node's bandwidth hierarchy: %w", err)
	}
	return flock.Exclusive(path, HierarchyLockTimeout, "the node's bandwidth hierarchy")
}

// HierarchyGCGrace is how long a class may go unclaimed by any record
// before the agent removes it: an ADD joins the hierarchy before it writes
// its full record (a chained ADD writes no record before), and takes
// milliseconds to do both.
const HierarchyGCGrace = 30 * time.Second

// HierarchyRepairer is the agent's drift repair and garbage collection of
// the node hierarchy, one comparison per pass (a reconcile.KernelRepairer):
// the capacity and the best-effort share the members' records imply, each
// member's class, entries and redirects, and the removal of classes no
// record has claimed for HierarchyGCGrace.
type HierarchyRepairer struct {
	nsFd int
	// lock is the node hierarchy's lock file ("" = none).
	lock string
	log  *slog.Logger
	// unclaimed: when each minor was first seen without a record.
	unclaimed map[uint16]time.Time
	// Now is the clock (tests).
	Now func() time.Time
}

// NewHierarchyRepairer works in the namespace nsFd (-1 = the caller's),
// under the lock file lock.
func NewHierarchyRepairer(nsFd int, lock string, log *slog.Logger) *HierarchyRepairer {
	if log == nil {
		log = slog.Default()
	}
	return &HierarchyRepairer{nsFd: nsFd, lock: lock, log: log, unclaimed: map[uint16]time.Time{}, Now: time.Now}
}

// Name labels the step in logs.
func (h *HierarchyRepairer) Name() string { return "bandwidth hierarchy" }

// Kinds are the repair kinds Repair reports.
func (h *HierarchyRepairer) Kinds() []string {
	return []string{RepairHierarchy, RepairHierarchyMember, RepairHierarchyGC}
}

// member is one record in the hierarchy.
type member struct {
	rec   *state.Record
	g     Guarantee
	minor uint16
	ips   []net.IP
}

func membersOf(live []*state.Record) ([]member, Capacity) {
	var out []member
	var capacity Capacity
	var newest time.Time
	// One pod per host veth and per class minor: where two records claim
	// one (a stale record of a pod whose namespace name came back), the
	// newer is the pod; restoring both would flip the class every pass.
	byVeth, byMinor := map[string]int{}, map[uint16]int{}
	for _, r := range live {
		if r.Shaping == nil || r.Shaping.Guarantee == nil {
			continue
		}
		g, minor := GuaranteeFromRecord(r.Shaping.Guarantee)
		m := member{rec: r, g: g, minor: minor, ips: r.Addrs()}
		i, ok := byVeth[r.HostVeth]
		if !ok || r.HostVeth == "" {
			i, ok = byMinor[minor]
		}
		switch {
		case !ok:
			out = append(out, m)
			i = len(out) - 1
		case r.Created.After(out[i].rec.Created):
			delete(byVeth, out[i].rec.HostVeth)
			delete(byMinor, out[i].minor)
			out[i] = m
		default:
			continue
		}
		byVeth[r.HostVeth], byMinor[minor] = i, i
		// The newest record has the config the plugin runs with now.
		if r.ShapingDefaults != nil && r.ShapingDefaults.NodeCapacity != nil && !r.Created.Before(newest) {
			capacity, newest = CapacityFromRecord(r.ShapingDefaults.NodeCapacity), r.Created
		}
	}
	return out, capacity
}

// Repair restores what live (complete records) needs of the hierarchy and
// collects the classes nobody claims.
func (h *HierarchyRepairer) Repair(live []*state.Record, _ []string) (map[string]int, error) {
	members, capacity := membersOf(live)
	s, err := Open(h.nsFd)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	if len(members) == 0 {
		// Nothing to restore; only what is left to collect.
		if l, err := s.linkOrNil(HierarchyIngressIFB); err != nil || l == nil {
			if l2, err2 := s.linkOrNil(HierarchyEgressIFB); err2 != nil || l2 == nil {
				return nil, errors.Join(err, err2)
			}
		}
	}
	l, err := LockHierarchy(h.lock)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	out := map[string]int{}
	var errs []error
	states, err := s.ReadHierarchies(true)
	if err != nil {
		return out, err
	}
	// The node: capacity and tables.
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		capBytes := capacity.bits(d) / 8
		st := states[d]
		if capBytes == 0 || (st.CapacityBytes == capBytes && st.Tables == 2) {
			continue
		}
		if err := s.EnsureHierarchy(d, capBytes, st.ReservedBytes); err != nil {
			errs = append(errs, fmt.Errorf("restore the %s hierarchy: %w", d, err))
			continue
		}
		out[RepairHierarchy]++
		h.log.Warn("restored the node's bandwidth hierarchy", "direction", d.String(), "capacity", capBytes*8,
			"had", st.CapacityBytes*8, "tables", st.Tables)
		if st, err = s.ReadHierarchyFull(d); err == nil {
			states[d] = st
		}
	}
	// The members.
	claimed := map[uint16]bool{}
	for _, m := range members {
		claimed[m.minor] = true
		if l, err := s.linkOrNil(m.rec.HostVeth); err != nil || l == nil {
			continue // a DEL in flight, or GC's to take
		}
		diff, err := s.DiffMember(m.g, m.minor, m.rec.HostVeth, m.ips, states)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(diff) == 0 {
			continue
		}
		if _, err := s.JoinNode(capacity, m.g, m.minor, m.rec.HostVeth, m.ips); err != nil {
			errs = append(errs, fmt.Errorf("restore the classes of %s/%s: %w", m.rec.Pod.Namespace, m.rec.Pod.Name, err))
			continue
		}
		out[RepairHierarchyMember]++
		h.log.Warn("restored a pod's place in the bandwidth hierarchy", "namespace", m.rec.Pod.Namespace, "pod", m.rec.Pod.Name,
			"minor", m.minor, "drift", diff)
	}
	// What nobody claims, after the grace.
	now := h.Now()
	seen := map[uint16]bool{}
	for _, st := range states {
		for minor := range st.Classes {
			seen[minor] = true
		}
		for minor := range st.Entries {
			if minor >= MinMinor && minor <= MaxMinor {
				seen[minor] = true
			}
		}
	}
	for minor := range h.unclaimed {
		if claimed[minor] || !seen[minor] {
			delete(h.unclaimed, minor)
		}
	}
	for minor := range seen {
		if claimed[minor] {
			continue
		}
		first, ok := h.unclaimed[minor]
		if !ok {
			h.unclaimed[minor] = now
			continue
		}
		if now.Sub(first) < HierarchyGCGrace {
			continue
		}
		if err := s.LeaveNode(minor, "", nil); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(h.unclaimed, minor)
		out[RepairHierarchyGC]++
		h.log.Warn("removed a bandwidth class no attachment claims", "minor", minor, "unclaimedFor", now.Sub(first).Round(time.Second))
	}
	// The best-effort share, which admission reads the sum of requests
	// from (hierget.go): from the classes the kernel has now. It is off
	// after a crash between a share and a class, or a hand's change.
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		if capacity.bits(d) == 0 {
			continue
		}
		st, err := s.readClasses(d)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		want := bestEffortShare(st.CapacityBytes, st.ReservedBytes)
		if st.CapacityBytes == 0 || st.BestEffortBytes == want {
			continue
		}
		if err := s.SetBestEffort(d, st.CapacityBytes, st.ReservedBytes); err != nil {
			errs = append(errs, fmt.Errorf("restore the %s best-effort share: %w", d, err))
			continue
		}
		out[RepairHierarchy]++
		h.log.Warn("restored the best-effort share of the node's bandwidth hierarchy", "direction", d.String(),
			"reserved", st.ReservedBytes*8, "bestEffort", want*8, "had", st.BestEffortBytes*8)
	}
	return out, errors.Join(errs...)
}
