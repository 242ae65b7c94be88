package reconcile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/cni/teardown"
	"github.com/qoscni/qoscni/internal/fault"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/ipam"
)

// qoscniLink matches the names podnet derives: host veths and IFBs.
var qoscniLink = podnet.DeviceNames

// gc removes stale attachments and leftover devices, and returns the
// records that are still live. complete says that every state directory
// could be read: without it, the record of a link or a hostPort may be in
// the one that could not, and only stale attachments are collected.
func (r *Reconciler) gc(recs []attachment, bad []state.BadFile, complete bool, res *PassResult) []attachment {
	live := make([]attachment, 0, len(recs))
	for _, rec := range recs {
		if !r.stale(rec.Record) {
			live = append(live, rec)
			continue
		}
		if err := r.cleanup(rec); err != nil {
			res.Errors++
			r.m.errors.WithLabelValues("gc").Inc()
			r.log.Error("gc stale attachment", "network", rec.Network, "container", rec.ContainerID, "ifname", rec.IfName, "err", err)
			live = append(live, rec) // still holds what it held
			continue
		}
		res.GCed++
		r.m.gc.WithLabelValues("attachment").Inc()
		r.log.Info("removed attachment whose pod and netns are gone", "network", rec.Network, "container", rec.ContainerID,
			"ifname", rec.IfName, "namespace", rec.Pod.Namespace, "pod", rec.Pod.Name, "netns", rec.Netns)
	}
	if !complete {
		// What the cleaners collect is what no live record holds, too.
		r.suspects = map[string]int{}
		return live
	}
	res.GCed += r.gcLinks(live, bad, res)
	liveRecs := make([]*state.Record, len(live))
	for i, a := range live {
		liveRecs[i] = a.Record
	}
	for _, c := range r.cfg.Cleaners {
		n, err := c.GC(liveRecs)
		if n > 0 {
			res.GCed += n
			r.m.gc.WithLabelValues(c.Name()).Add(float64(n))
		}
		if err != nil {
			res.Errors++
			r.m.errors.WithLabelValues("gc").Inc()
			r.log.Error("gc", "step", c.Name(), "err", err)
		}
	}
	return live
}

// stale: the pod's netns is gone, and the API says the pod is gone too
// (or there is no API). A record without a netns path is left to the
// runtime's DEL and GC.
func (r *Reconciler) stale(rec *state.Record) bool {
	if rec.Netns == "" || !netnsGone(rec.Netns) {
		return false
	}
	if r.cfg.Pods == nil {
		return true
	}
	if !r.cfg.Pods.Synced() {
		return false
	}
	if rec.Pod.Name == "" {
		return true
	}
	pod, ok := r.cfg.Pods.Pod(rec.Pod.Namespace, rec.Pod.Name)
	return !ok || !samePod(rec, pod)
}

// netnsGone reports a netns path that no longer names a network
// namespace. When its directory is missing (the agent's pod lacks the
// host mount) nothing can be told, and nothing is called gone.
func netnsGone(path string) bool {
	if _, err := os.Stat(filepath.Dir(path)); err != nil {
		return false
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return errors.Is(err, unix.ENOENT)
	}
	defer unix.Close(fd)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return false
	}
	// The bind mount is gone and a plain file is left: the namespace died.
	return st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC
}

// cleanup removes a stale attachment: kernel objects first, then the
// addresses, then the record, so that an agent killed half way finds the
// record again at its next pass and finishes (the plugin's DEL releases
// last instead: the runtime's next DEL or GC finds the addresses by owner;
// the agent has no such second chance). Released before the record, an
// address may be another attachment's by the time a killed agent comes
// back: its masquerade stays. The record goes from the store it was read
// from.
func (r *Reconciler) cleanup(a attachment) error {
	rec := a.Record
	order := []teardown.Step{teardown.Devices, teardown.Masq, teardown.Ports}
	alloc, allocErr := r.allocator(rec)
	if allocErr == nil {
		// Without the IPAM store the kernel objects still go, and the
		// record stays, so that a later pass releases the addresses.
		order = append(order, teardown.Addresses, teardown.Record)
	}
	var addrs teardown.IPAM // not a nil *ipam.Allocator in a non-nil interface
	if alloc != nil {
		addrs = alloc
	}
	cleaners := make([]teardown.Cleaner, len(r.cfg.Cleaners))
	for i, c := range r.cfg.Cleaners {
		cleaners[i] = c
	}
	// The step names test/reliability kills the agent at (agentGCSteps).
	points := map[teardown.Step]string{teardown.Devices: "links", teardown.Masq: "masq", teardown.Ports: "cleaners",
		teardown.Addresses: "ipam", teardown.Record: "state"}
	err := teardown.Run(rec.Key(), rec, teardown.Options{
		Order:           order,
		NetnsFd:         r.cfg.NetnsFd,
		Links:           r.nl,
		Shaper:          r.shaper,
		Store:           a.store,
		IPAM:            addrs,
		SpareReassigned: true,
		Cleaners:        cleaners,
		HierarchyLock:   r.hierarchyLock(),
		Mark:            func(s teardown.Step, _ time.Duration) { fault.At("gc", points[s]) },
	})
	return errors.Join(allocErr, err)
}

// allocator is the built-in IPAM store of the record's network, nil for a
// chained attachment (the main plugin's addresses) or when the CNI config
// dir has no qoscni network of that name with built-in IPAM.
func (r *Reconciler) allocator(rec *state.Record) (*ipam.Allocator, error) {
	if rec.Mode == state.ModeChained || r.cfg.CNIConfDir == "" {
		return nil, nil
	}
	n, ok, errs := cniconf.IPAMNetworkByName(r.cfg.CNIConfDir, rec.Network)
	if !ok {
		if len(rec.IPs) > 0 || rec.Provisional {
			r.log.Warn("addresses of a removed attachment not released: no qoscni network with built-in IPAM of that name in the CNI config dir",
				"network", rec.Network, "container", rec.ContainerID, "ifname", rec.IfName, "ips", rec.IPs, "cniConfDir", r.cfg.CNIConfDir, "configErrors", errors.Join(errs...))
		}
		return nil, nil
	}
	a, err := ipam.New(n.Config, n.Name)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s/%s: %w", rec.ContainerID, rec.IfName, err)
	}
	return a, nil
}

// gcLinks deletes qoscni-named links that no record accounts for and
// nothing uses. A record may sit in a state directory the agent does not
// know (a network whose config it cannot read), so the kernel has the
// last word: a veth whose peer lives in another namespace, or an IFB that
// a redirect targets, belongs to a live pod (see inUse). And an ADD
// creates its devices before it writes the record, so a link is deleted
// only when two consecutive passes saw it unaccounted for and unused,
// with the same ifindex.
func (r *Reconciler) gcLinks(live []attachment, bad []state.BadFile, res *PassResult) int {
	known := map[string]bool{}
	account := func(cid, ifname string) {
		known[podnet.HostVethName(cid, ifname)] = true
		known[podnet.IFBName(cid, ifname)] = true
	}
	for _, rec := range live {
		account(rec.ContainerID, rec.IfName)
		known[rec.HostVeth] = true
		known[ifbOf(rec.Record)] = true
	}
	blind := 0
	for _, b := range bad {
		// An undecodable record still claims its attachment's devices, by
		// its file name; one whose name does not give the attachment (a
		// capped long name, a foreign file) could claim any of them.
		k, ok := state.KeyFromFileName(filepath.Base(filepath.Dir(b.Path)), filepath.Base(b.Path))
		if !ok {
			blind++
			continue
		}
		account(k.ContainerID, k.IfName)
	}
	if blind > 0 {
		r.suspects = nil
		r.log.Warn("leftover links not collected: unreadable state files that do not name their attachment", "files", blind)
		return 0
	}
	links, err := r.nl.LinkList()
	if err != nil {
		res.Errors++
		r.m.errors.WithLabelValues("gc").Inc()
		r.log.Error("list links", "err", err)
		return 0
	}
	var unknown []netlink.Link
	for _, l := range links {
		if a := l.Attrs(); qoscniLink.MatchString(a.Name) && !known[a.Name] {
			unknown = append(unknown, l)
		}
	}
	used := r.inUseLinks(unknown, res)
	removed := 0
	next := map[string]int{}
	for _, l := range unknown {
		a := l.Attrs()
		if used[a.Index] {
			continue
		}
		if idx, ok := r.suspects[a.Name]; !ok || idx != a.Index {
			next[a.Name] = a.Index
			continue
		}
		kind := "veth"
		if strings.HasPrefix(a.Name, "qi") {
			kind = "ifb"
		}
		if err := r.nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			res.Errors++
			r.m.errors.WithLabelValues("gc").Inc()
			r.log.Error("delete leftover link", "link", a.Name, "err", err)
			next[a.Name] = a.Index
			continue
		}
		removed++
		r.m.gc.WithLabelValues(kind).Inc()
		r.log.Info("removed leftover link without a state record", "link", a.Name, "kind", kind)
	}
	r.suspects = next
	return removed
}

// linkExists reports whether the node namespace has a link of that name.
func (r *Reconciler) linkExists(name string) (bool, error) {
	return podnet.LinkExists(r.nl, name)
}
