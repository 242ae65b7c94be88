// Package metrics turns the plugin's attachment records, the live tc
// statistics of the node, the plugin's call journal and the IPAM stores into
// Prometheus metrics, read at scrape time by one custom collector.
package metrics

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// Direction names, also the values of the "direction" label.
const (
	DirIngress = "ingress" // into the pod: root of the host veth
	DirEgress  = "egress"  // out of the pod: root of the IFB
)

// DirStats is one shaped direction of an attachment.
type DirStats struct {
	Direction string
	Config    state.Direction
	// Stats is nil when the device or its root qdisc was not found.
	Stats *QdiscStats
}

// GuaranteeStats is one direction of an attachment's class in the node's
// guaranteed-bandwidth hierarchy.
type GuaranteeStats struct {
	Direction string
	Minor     uint16
	Config    state.GuaranteeDirection
	// Class is nil when the direction's hierarchy has no class of Minor.
	Class *shaping.HierClass
}

// Attachment is one state record joined with its live statistics.
type Attachment struct {
	Record     *state.Record
	Namespace  string
	Pod        string
	Interface  string
	Dirs       []DirStats
	Guarantees []GuaranteeStats
}

// NodeHierarchy is one direction of the node's guaranteed-bandwidth
// hierarchy as the kernel has it.
type NodeHierarchy struct {
	Direction     string
	CapacityBytes uint64 // class 1:1's rate
	ReservedBytes uint64 // the sum of the pods' requests
}

// HeadroomBytes is what a new request can still get; negative when the
// capacity was lowered below what pods hold.
func (h NodeHierarchy) HeadroomBytes() float64 {
	return float64(h.CapacityBytes) - float64(h.ReservedBytes)
}

// Identity is the label set of an attachment on the hot series.
type Identity struct{ Namespace, Pod, Interface string }

func (a *Attachment) Identity() Identity { return Identity{a.Namespace, a.Pod, a.Interface} }

// Snapshot is what one scrape sees.
type Snapshot struct {
	Attachments []Attachment
	// Hidden are records whose namespace/pod/interface another, preferred,
	// record already exports (a stale record of an older sandbox of the pod,
	// or the same pod in two networks): exporting both would give Prometheus
	// two series with one label set, so only the preferred one is exported.
	Hidden []*state.Record
	Bad    []state.BadFile
	// Hierarchy is the node hierarchy, one entry per direction it exists in.
	Hierarchy []NodeHierarchy
	// HierarchyErr says the hierarchy could not be read; the rest of the
	// snapshot stands, without the pods' classes.
	HierarchyErr error
}

// podName is the pod label: the Kubernetes name, or for a runtime that
// passed no pod identity the short container ID (one per attachment anyway).
func podName(r *state.Record) string {
	if r.Pod.Name != "" {
		return r.Pod.Name
	}
	id := r.ContainerID
	if len(id) > 12 {
		id = id[:12]
	}
	return id
}

// Records lists attachment records (a state.Cache re-reads only changed files).
type Records interface {
	List() ([]*state.Record, []state.BadFile, error)
}

// NodeRecords lists the records of every state directory of the node
// (cniconf.StateSources, found anew on each call, so a new network is
// seen at the next scrape), each through a cache kept between calls.
type NodeRecords struct {
	sources cniconf.StateSources
	caches  *state.Caches
}

// NewNodeRecords reads the directories of src.
func NewNodeRecords(src cniconf.StateSources) *NodeRecords {
	return &NodeRecords{sources: src, caches: state.NewCaches()}
}

// List fails when any state directory cannot be read: a scrape that
// silently left one out would end the series of its pods.
func (n *NodeRecords) List() ([]*state.Record, []state.BadFile, error) {
	// A config file that does not parse is the reconciler's to report,
	// once; the directories found are read all the same.
	dirs, _ := n.sources.Dirs()
	entries, bad, errs := n.caches.Entries(dirs)
	if len(errs) > 0 {
		return nil, nil, errors.Join(errs...)
	}
	recs := make([]*state.Record, 0, len(entries))
	for _, e := range entries {
		recs = append(recs, e.Record)
	}
	return recs, bad, nil
}

// Take reads every record and the root qdiscs of the namespace: one
// directory walk, one link dump, one qdisc dump, and where the node has
// a guaranteed-bandwidth hierarchy one class dump per direction.
func Take(store Records, ns *Netns) (*Snapshot, error) {
	recs, bad, err := store.List()
	if err != nil {
		return nil, fmt.Errorf("read attachment records: %w", err)
	}
	var qd map[string]QdiscStats
	var hier map[string]shaping.HierState
	var hierErr error
	if len(recs) > 0 {
		if qd, err = ReadRootQdiscs(ns); err != nil {
			return nil, err
		}
		hier, hierErr = readHierarchies(ns, qd)
	}
	snap := join(recs, bad, qd, hier)
	snap.HierarchyErr = hierErr
	return snap, nil
}

// readHierarchies reads the directions whose IFB has an HTB root (the
// qdisc dump says so: a node without the feature opens no more sockets).
func readHierarchies(ns *Netns, qd map[string]QdiscStats) (map[string]shaping.HierState, error) {
	var dirs []shaping.HierDirection
	for _, d := range []shaping.HierDirection{shaping.IntoPods, shaping.OutOfPods} {
		if q, ok := qd[d.IFB()]; ok && q.Kind == "htb" {
			dirs = append(dirs, d)
		}
	}
	if len(dirs) == 0 {
		return nil, nil
	}
	sh, err := shaping.Open(ns.shapingFd())
	if err != nil {
		return nil, err
	}
	defer sh.Close()
	out := make(map[string]shaping.HierState, len(dirs))
	for _, d := range dirs {
		st, err := sh.ReadHierarchy(d)
		if err != nil {
			return out, fmt.Errorf("read the node's %s hierarchy: %w", d, err)
		}
		if st.CapacityBytes > 0 {
			out[d.String()] = st
		}
	}
	return out, nil
}

func join(recs []*state.Record, bad []state.BadFile, qd map[string]QdiscStats, hier map[string]shaping.HierState) *Snapshot {
	snap := &Snapshot{Bad: bad}
	for _, d := range []string{DirIngress, DirEgress} {
		if st, ok := hier[d]; ok {
			snap.Hierarchy = append(snap.Hierarchy, NodeHierarchy{Direction: d, CapacityBytes: st.CapacityBytes, ReservedBytes: st.ReservedBytes})
		}
	}
	all := make([]Attachment, 0, len(recs))
	for _, r := range recs {
		if r.Provisional {
			continue // an ADD under way
		}
		a := Attachment{Record: r, Namespace: r.Pod.Namespace, Pod: podName(r), Interface: r.IfName}
		if sh := r.Shaping; sh != nil {
			for _, d := range []struct {
				name string
				cfg  *state.Direction
			}{{DirIngress, sh.Ingress}, {DirEgress, sh.Egress}} {
				if d.cfg == nil || d.cfg.Device == "" {
					continue
				}
				ds := DirStats{Direction: d.name, Config: *d.cfg}
				if s, ok := qd[d.cfg.Device]; ok {
					ds.Stats = &s
				}
				a.Dirs = append(a.Dirs, ds)
			}
			if g := sh.Guarantee; g != nil {
				for _, d := range []struct {
					name string
					cfg  *state.GuaranteeDirection
				}{{DirIngress, g.Ingress}, {DirEgress, g.Egress}} {
					if d.cfg == nil {
						continue
					}
					gs := GuaranteeStats{Direction: d.name, Minor: g.Minor, Config: *d.cfg}
					if c, ok := hier[d.name].Classes[g.Minor]; ok {
						gs.Class = &c
					}
					a.Guarantees = append(a.Guarantees, gs)
				}
			}
		}
		all = append(all, a)
	}
	// Preferred first within one identity: live devices, then the newest record.
	slices.SortFunc(all, func(x, y Attachment) int {
		if c := cmp.Compare(x.Namespace, y.Namespace); c != 0 {
			return c
		}
		if c := cmp.Compare(x.Pod, y.Pod); c != 0 {
			return c
		}
		if c := cmp.Compare(x.Interface, y.Interface); c != 0 {
			return c
		}
		if c := cmp.Compare(live(y), live(x)); c != 0 {
			return c
		}
		if c := newest(y.Record).Compare(newest(x.Record)); c != 0 {
			return c
		}
		return cmp.Compare(x.Record.ContainerID+x.Record.Network, y.Record.ContainerID+y.Record.Network)
	})
	for i := range all {
		if i > 0 && all[i].Identity() == all[i-1].Identity() {
			snap.Hidden = append(snap.Hidden, all[i].Record)
			continue
		}
		snap.Attachments = append(snap.Attachments, all[i])
	}
	return snap
}

func live(a Attachment) int {
	n := 0
	for _, d := range a.Dirs {
		if d.Stats != nil {
			n++
		}
	}
	for _, g := range a.Guarantees {
		if g.Class != nil {
			n++
		}
	}
	return n
}

func newest(r *state.Record) time.Time {
	if r.Updated.After(r.Created) {
		return r.Updated
	}
	return r.Created
}
