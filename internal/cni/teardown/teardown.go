// Package teardown removes what one attachment holds. Three callers do it,
// each with its own order of steps, and all of them through Run:
//
//   - the plugin's DEL (and CNI GC, and ADD's removal of what a killed ADD
//     left): kernel objects, then the record, then the addresses, so an
//     address is never free while something still uses it; a DEL killed
//     after the record went finds the addresses by owner at the runtime's
//     next DEL or GC;
//   - the agent's GC of an attachment whose pod is gone: kernel objects,
//     then the addresses, then the record, because the agent has no such
//     second call: the record is what brings it back to finish;
//   - uninstall: only the shaping, and the record stays (uninstall keeps
//     the pods' connectivity and leaves their state to the runtime).
//
// It links nothing only the agent may: the plugin binary runs it on every
// pod's DEL.
package teardown

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/ipam"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

// Step is one kind of thing an attachment holds, removed as a unit.
type Step int

const (
	// Devices: in standalone mode the host veth (its pod end goes with it)
	// and the IFB; in chained mode the veth is the main plugin's, so only
	// qoscni's qdiscs and IFB come off it (and its localnet guard, with
	// Options.ReleaseLocalnet).
	Devices Step = iota + 1
	// Shaping: qoscni's qdiscs and the IFB the record names, off the
	// recorded host veth, in either mode. The veth stays, and the pod keeps
	// its connectivity.
	Shaping
	// Masq: the masquerade elements of the attachment's addresses.
	Masq
	// Ports: each of Options.Cleaners (portmap's hostPort elements).
	Ports
	// Record: the state record, from Options.Store.
	Record
	// Addresses: the addresses, released to Options.IPAM. A chained
	// attachment's are the main plugin's and stay.
	Addresses
)

func (s Step) String() string {
	switch s {
	case Devices:
		return "devices"
	case Shaping:
		return "shaping"
	case Masq:
		return "masq"
	case Ports:
		return "ports"
	case Record:
		return "record"
	case Addresses:
		return "addresses"
	}
	return fmt.Sprintf("step(%d)", int(s))
}

// durable steps keep what tells a retry what is left to clean (the
// record) or what must not be reused while a kernel object still names it
// (the addresses).
func (s Step) durable() bool { return s == Record || s == Addresses }

// IPAM is the address management of the attachment's network.
type IPAM interface {
	// Get returns the addresses held for the attachment (none when the
	// IPAM cannot tell, as a delegated plugin).
	Get(containerID, ifName string) ([]net.IP, error)
	Release(containerID, ifName string) error
}

// owners is an IPAM that can tell which attachment holds an address now
// (the built-in store).
type owners interface {
	Owner(ip net.IP) (ipam.Attachment, bool)
}

// Cleaner removes what one attachment holds beyond devices, masquerade,
// record and addresses (portmap.Cleaner: hostPort elements). Del gets a
// provisional record when the attachment's own is missing or unreadable,
// and must be idempotent.
type Cleaner interface {
	Name() string
	Del(rec *state.Record) error
}

// Queuer is a Cleaner that can put its removals into an nftables
// transaction shared with the call's other removals (OneTransaction);
// after, when not nil, runs once it was sent. handled false: the record
// is not one it queues for (a provisional one), and its Del runs.
type Queuer interface {
	Queue(rec *state.Record, r *nfraw.Conn, b *nfraw.Batch) (after func() error, handled bool, err error)
}

// Options are what differs between callers.
type Options struct {
	// Order lists the steps to run, in order. A step that changes the
	// kernel runs whatever failed before it, its error is collected; a
	// durable step (Record, Addresses) runs only when every step before
	// it succeeded, so a failure keeps the record for a retry.
	Order []Step
	// NetnsFd is the node namespace (-1 = the caller's).
	NetnsFd int
	// Links and Shaper work in NetnsFd; nil ones are opened for the call
	// (the plugin's), the agent passes its own.
	Links  *netlink.Handle
	Shaper *shaping.Shaper
	// Store holds the record (Record step).
	Store *state.Store
	// IPAM is the network's; nil when there is none to ask (chained mode,
	// or a network whose config is gone).
	IPAM IPAM
	// Masq says the network's config masquerades; the record's IPMasq
	// counts too.
	Masq bool
	// SpareReassigned keeps the masquerade of a recorded address that
	// IPAM now gives to another attachment: the agent releases addresses
	// before the record, so one killed in between finds them reused.
	SpareReassigned bool
	// Cleaners run in the Ports step.
	Cleaners []Cleaner
	// HierarchyLock is the node hierarchy's lock file (paths.HierarchyLock
	// on a node), taken around a member's leave.
	HierarchyLock string
	// ReleaseLocalnet takes the localnet guard off a chained attachment's
	// own veth (marker files in LocalnetDir) in the Devices step.
	ReleaseLocalnet bool
	LocalnetDir     string
	// Concurrent runs the kernel steps between two durable ones at once,
	// each on its own sockets, and in the Devices step (in the caller's own
	// namespace) deletes the veth and the IFB in one request: each device
	// deletion and each nftables transaction that removed objects waits
	// for an RCU grace period (make bench-floor). Only for callers whose
	// Cleaners share no socket (the plugin's); the order between durable
	// steps is kept.
	Concurrent bool
	// OneTransaction, with Concurrent, sends the Masq step's removals and
	// those of the Cleaners that are Queuers in one nftables transaction,
	// and closes its socket only after the other kernel steps: closing a
	// socket after each transaction that removed elements costs a
	// grace-period wait (about 12 ms here, make bench-floor), these waits
	// do not overlap, and one that comes after the device deletion finds
	// its grace period over.
	OneTransaction bool
	// Mark is called after each step that ran (after a failed kernel step
	// too), with the step's own time: the callers' timings and
	// fault-injection points. With Concurrent, the steps of a group call
	// it from their own goroutines, as each ends.
	Mark func(Step, time.Duration)
}

// Run tears the attachment key down. rec is its record, nil when there is
// none or it is unreadable: then, as with a provisional record, only the
// attachment's identity is known, and its addresses and hostPorts are
// found by owner.
func Run(key state.Key, rec *state.Record, o Options) error {
	if rec == nil {
		rec = &state.Record{Network: key.Network, ContainerID: key.ContainerID, IfName: key.IfName, Provisional: true}
	}
	t := &run{key: key, rec: rec, o: o}
	// Before the first change: a socket that will not open changes nothing.
	if err := t.open(); err != nil {
		return err
	}
	defer t.close()
	var errs []error
	for i := 0; i < len(o.Order); {
		s := o.Order[i]
		if s.durable() {
			if len(errs) > 0 {
				return errors.Join(errs...)
			}
			if err := t.timed(s); err != nil {
				return err
			}
			i++
			continue
		}
		j := i + 1
		for j < len(o.Order) && !o.Order[j].durable() && o.Concurrent {
			j++
		}
		for _, err := range t.together(o.Order[i:j]) {
			if err != nil {
				errs = append(errs, err)
			}
		}
		i = j
	}
	return errors.Join(errs...)
}

// timed runs one step and marks it.
func (t *run) timed(s Step) error {
	start := time.Now()
	err := t.step(s)
	if t.o.Mark != nil {
		t.o.Mark(s, time.Since(start))
	}
	return err
}

// together runs kernel steps at once (one alone in place) and returns
// their errors. With OneTransaction, Masq and Ports run as one
// transaction, committed beside the other steps, and its socket closes
// after them: closing an nfnetlink socket after a transaction removed
// objects waits for nf_tables' destroy work (an RCU grace period) under
// the lock a device's unregistration takes too, so a close beside the
// device deletion makes one wait queue behind the other, while a close
// after it finds that work done (make bench-floor: 26-29 ms against 18).
func (t *run) together(steps []Step) []error {
	errs := make([]error, len(steps))
	if len(steps) == 1 && !(t.o.OneTransaction && (steps[0] == Masq || steps[0] == Ports)) {
		errs[0] = t.timed(steps[0])
		return errs
	}
	var nft []int
	var wg sync.WaitGroup
	for i, s := range steps {
		if t.o.OneTransaction && (s == Masq || s == Ports) {
			nft = append(nft, i)
			continue
		}
		wg.Go(func() { errs[i] = t.timed(s) })
	}
	if len(nft) == 0 {
		wg.Wait()
		return errs
	}
	var tx *nftTx
	var took time.Duration
	done := make(chan struct{})
	go func() {
		defer close(done)
		start := time.Now()
		tx = t.nftSend(slices.Contains(steps, Masq), slices.Contains(steps, Ports))
		took = time.Since(start)
	}()
	wg.Wait()
	<-done
	start := time.Now()
	masq, ports := tx.finish(t)
	took += time.Since(start)
	for _, i := range nft {
		if steps[i] == Masq {
			errs[i] = masq
		} else {
			errs[i] = ports
		}
		if t.o.Mark != nil {
			t.o.Mark(steps[i], took)
		}
	}
	return errs
}

// nftTx is the Masq and Ports steps' transaction, sent: what is left is
// closing its socket and what runs after it.
type nftTx struct {
	r                 *nfraw.Conn // nil: nothing left to close
	after             []func() error
	rest              []Cleaner
	masq, ports       bool
	masqErr, portsErr error
}

// nftSend is the Masq step (masq) and the Ports step (ports) with their
// nftables removals in one transaction, sent; finish does the rest.
func (t *run) nftSend(masq, ports bool) *nftTx {
	tx := &nftTx{masq: masq, ports: ports}
	r, err := nfraw.Dial(t.o.NetnsFd)
	if err != nil {
		// Each step on its own sockets, in finish.
		return tx
	}
	tx.r = r
	for attempt := 0; ; attempt++ {
		b := &nfraw.Batch{}
		tx.after, tx.rest, tx.masqErr, tx.portsErr = nil, nil, nil, nil
		if masq {
			tx.masqErr = t.queueMasq(r, b)
		}
		if ports {
			for _, c := range t.o.Cleaners {
				q, ok := c.(Queuer)
				if !ok {
					tx.rest = append(tx.rest, c)
					continue
				}
				a, handled, err := q.Queue(t.rec, r, b)
				switch {
				case err != nil:
					tx.portsErr = errors.Join(tx.portsErr, fmt.Errorf("remove %s of %s: %w", c.Name(), t.id(), err))
				case !handled:
					tx.rest = append(tx.rest, c)
				case a != nil:
					tx.after = append(tx.after, a)
				}
			}
		}
		err := r.Send(b)
		if err == nil {
			return tx
		}
		// An element went between the look and the batch (all or none
		// of it applied): look again, once.
		if attempt == 0 && errors.Is(err, unix.ENOENT) {
			continue
		}
		err = fmt.Errorf("remove the nftables elements of %s: %w", t.id(), err)
		if masq {
			tx.masqErr = errors.Join(tx.masqErr, err)
		}
		if ports {
			tx.portsErr = errors.Join(tx.portsErr, err)
		}
		tx.after = nil
		return tx
	}
}

// finish closes the transaction's socket, then runs what goes after it
// (a conntrack flush) and the Cleaners it did not queue for.
func (tx *nftTx) finish(t *run) (masqErr, portsErr error) {
	if tx.r == nil {
		if tx.masq {
			masqErr = t.step(Masq)
		}
		if tx.ports {
			portsErr = t.step(Ports)
		}
		return masqErr, portsErr
	}
	tx.r.Close()
	masqErr, portsErr = tx.masqErr, tx.portsErr
	for _, a := range tx.after {
		portsErr = errors.Join(portsErr, a())
	}
	for _, c := range tx.rest {
		if err := c.Del(t.rec); err != nil {
			portsErr = errors.Join(portsErr, fmt.Errorf("remove %s of %s: %w", c.Name(), t.id(), err))
		}
	}
	return masqErr, portsErr
}

// queueMasq puts the masquerade removals of the attachment into b.
func (t *run) queueMasq(r *nfraw.Conn, b *nfraw.Batch) error {
	ips, err := t.addrs()
	if err != nil {
		return err
	}
	if len(ips) == 0 || !(t.o.Masq || t.rec.IPMasq) {
		return nil
	}
	if err := podnet.QueueMasqDel(r, b, ips); err != nil {
		return fmt.Errorf("remove ipMasq of %s: %w", t.id(), err)
	}
	return nil
}

type run struct {
	key     state.Key
	rec     *state.Record
	o       Options
	closers []func()
}

func (t *run) id() string { return t.key.ContainerID + "/" + t.key.IfName }

func (t *run) chained() bool { return t.rec.Mode == state.ModeChained }

func (t *run) inHierarchy() bool {
	return t.rec != nil && t.rec.Shaping != nil && t.rec.Shaping.Guarantee != nil
}

func (t *run) open() error {
	var links, shaper bool
	for _, s := range t.o.Order {
		switch {
		case s == Shaping, s == Devices && t.chained():
			shaper = true
		case s == Devices:
			links = true
			// A member of the node hierarchy leaves it before its veth goes.
			shaper = shaper || t.inHierarchy()
		}
	}
	if shaper && t.o.Shaper == nil {
		sh, err := shaping.Open(t.o.NetnsFd)
		if err != nil {
			return err
		}
		t.o.Shaper = sh
		t.closers = append(t.closers, sh.Close)
	}
	if links && t.o.Links == nil {
		h, err := t.handle()
		if err != nil {
			t.close()
			return err
		}
		t.o.Links = h
		t.closers = append(t.closers, h.Close)
	}
	return nil
}

// handle opens a netlink socket in the node namespace.
func (t *run) handle() (*netlink.Handle, error) {
	var h *netlink.Handle
	var err error
	if t.o.NetnsFd >= 0 {
		h, err = netlink.NewHandleAt(netns.NsHandle(t.o.NetnsFd))
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	return h, nil
}

func (t *run) close() {
	for _, c := range t.closers {
		c()
	}
	t.closers = nil
}

func (t *run) step(s Step) error {
	switch s {
	case Devices:
		return t.devices()
	case Shaping:
		if err := t.leaveHierarchy(); err != nil {
			return err
		}
		if err := t.o.Shaper.Remove(t.rec.HostVeth, t.ifb(false)); err != nil {
			return fmt.Errorf("remove shaping of %s: %w", t.id(), err)
		}
		return nil
	case Masq:
		return t.masq()
	case Ports:
		errs := make([]error, len(t.o.Cleaners))
		t.each(len(t.o.Cleaners), func(i int) {
			c := t.o.Cleaners[i]
			if err := c.Del(t.rec); err != nil {
				errs[i] = fmt.Errorf("remove %s of %s: %w", c.Name(), t.id(), err)
			}
		})
		return errors.Join(errs...)
	case Record:
		if t.o.Store == nil {
			return fmt.Errorf("remove the record of %s: no state store", t.id())
		}
		return t.o.Store.Delete(t.key)
	case Addresses:
		if t.chained() || t.o.IPAM == nil {
			return nil
		}
		if err := t.o.IPAM.Release(t.key.ContainerID, t.key.IfName); err != nil {
			return fmt.Errorf("release addresses of %s: %w", t.id(), err)
		}
		return nil
	}
	return fmt.Errorf("teardown of %s: unknown step %v", t.id(), s)
}

// ifb is the attachment's IFB: the recorded one, else (derive) the name
// ADD gives it, which a killed ADD may have made before any record said
// so. Shaping does not derive it: uninstall sweeps every qoscni IFB once
// every redirect to one is gone.
func (t *run) ifb(derive bool) string {
	if t.rec.Shaping != nil && t.rec.Shaping.IFB != "" {
		return t.rec.Shaping.IFB
	}
	if !derive {
		return ""
	}
	return podnet.IFBName(t.key.ContainerID, t.key.IfName)
}

// leaveHierarchy takes the attachment's classes out of the node
// hierarchy (its record names the minor) and gives its requests back.
func (t *run) leaveHierarchy() error {
	if !t.inHierarchy() {
		return nil
	}
	l, err := shaping.LockHierarchy(t.o.HierarchyLock)
	if err != nil {
		return err
	}
	defer l.Unlock()
	if err := t.o.Shaper.LeaveNode(t.rec.Shaping.Guarantee.Minor, t.rec.HostVeth, t.rec.Addrs()); err != nil {
		return fmt.Errorf("take %s out of the node's bandwidth hierarchy: %w", t.id(), err)
	}
	return nil
}

func (t *run) devices() error {
	var errs []error
	// Before the veth goes: its redirects to the node's IFBs go first.
	if err := t.leaveHierarchy(); err != nil {
		errs = append(errs, err)
	}
	if t.chained() {
		if t.o.ReleaseLocalnet {
			// Behind a main plugin without a bridge the localnet guard sits
			// on this pod's own veth: it goes first (then the clsact qdisc
			// is empty and goes with the shaping).
			if err := portmap.ReleaseLocalnet(t.o.NetnsFd, t.o.LocalnetDir, t.rec.HostVeth); err != nil {
				errs = append(errs, fmt.Errorf("release route_localnet of %s: %w", t.rec.HostVeth, err))
			}
		}
		if err := t.o.Shaper.Remove(t.rec.HostVeth, t.ifb(true)); err != nil {
			errs = append(errs, fmt.Errorf("remove shaping of %s: %w", t.id(), err))
		}
		return errors.Join(errs...)
	}
	// The veth (its pod end goes with it) and the IFB. Concurrent, in the
	// caller's own namespace: in one request (podnet.DeleteTogether), and
	// an egress packet of the pod being deleted may then meet a redirect
	// to an IFB already gone, and is dropped. Otherwise the veth first:
	// its redirect to the IFB goes with it.
	veth, ifb := podnet.HostVethName(t.key.ContainerID, t.key.IfName), t.ifb(true)
	if t.o.Concurrent && t.o.NetnsFd < 0 {
		return errors.Join(append(errs, podnet.DeleteTogether(t.o.Links, veth, ifb))...)
	}
	for _, name := range []string{veth, ifb} {
		if err := podnet.DeleteLink(t.o.Links, name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// each runs f(0..n-1), at once with Concurrent.
func (t *run) each(n int, f func(int)) {
	if !t.o.Concurrent {
		for i := range n {
			f(i)
		}
		return
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { f(i) })
	}
	wg.Wait()
}

func (t *run) masq() error {
	ips, err := t.addrs()
	if err != nil {
		return err
	}
	if len(ips) == 0 || !(t.o.Masq || t.rec.IPMasq) {
		return nil
	}
	m, err := podnet.NewMasq(t.o.NetnsFd)
	if err == nil {
		err = m.Del(ips)
	}
	if err != nil {
		return fmt.Errorf("remove ipMasq of %s: %w", t.id(), err)
	}
	return nil
}

// addrs are the attachment's addresses: the record's, or, for a
// provisional record (no addresses yet), those the IPAM holds for it.
func (t *run) addrs() ([]net.IP, error) {
	if t.rec.Provisional {
		if t.o.IPAM == nil {
			return nil, nil
		}
		ips, err := t.o.IPAM.Get(t.key.ContainerID, t.key.IfName)
		if err != nil {
			return nil, fmt.Errorf("look up addresses of %s: %w", t.id(), err)
		}
		return ips, nil
	}
	own, _ := t.o.IPAM.(owners)
	var out []net.IP
	for _, ip := range t.rec.Addrs() {
		if t.o.SpareReassigned && own != nil {
			if o, ok := own.Owner(ip); ok && (o.ContainerID != t.key.ContainerID || o.IfName != t.key.IfName) {
				continue
			}
		}
		out = append(out, ip)
	}
	return out, nil
}
