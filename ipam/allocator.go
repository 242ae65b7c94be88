package ipam

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// DefaultLockTimeout bounds the wait for the store lock.
const DefaultLockTimeout = 30 * time.Second

// ErrNoFreeAddress is wrapped by Allocate when a range set is exhausted.
var ErrNoFreeAddress = errors.New("no free address")

// Attachment identifies one interface of one container, the unit that holds addresses.
type Attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

// RangeUsage is the occupancy of one range set.
type RangeUsage struct {
	Set     int      // index into Config.Ranges
	Subnets []string // subnets of the set's ranges
	Total   uint64   // allocatable addresses; saturates at math.MaxUint64 (large IPv6 ranges)
	Used    uint64   // reserved addresses inside the set's ranges
}

// Allocator hands out addresses of one network from a durable store shared by all
// plugin processes. Its methods are safe for concurrent use; each call takes the store
// lock on its own file descriptor.
type Allocator struct {
	// LockTimeout bounds the wait for the store lock (New sets DefaultLockTimeout);
	// zero or negative means a single attempt.
	LockTimeout time.Duration

	dir      string
	sets     []rangeSet
	gateways []netip.Addr
	// storeOnly: opened without a config (OpenStore); it cannot allocate.
	storeOnly bool
}

// New opens, creating it with mode 0700 if needed, the store dataDir/<network>/ for cfg.
// It validates cfg first, which fills its defaults.
func New(cfg *Config, network string) (*Allocator, error) {
	if cfg == nil {
		return nil, errors.New("ipam: nil config")
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if network == "" || network == "." || network == ".." || strings.ContainsAny(network, "/\x00") {
		return nil, fmt.Errorf("ipam: network name %q cannot name a store directory", network)
	}
	a := &Allocator{LockTimeout: DefaultLockTimeout, dir: filepath.Join(cfg.DataDir, network)}
	for i, set := range cfg.Ranges {
		spans := make([]span, len(set))
		for j := range set {
			s, err := cfg.canonicalize(i, j)
			if err != nil {
				return nil, err
			}
			spans[j] = s
			a.gateways = append(a.gateways, s.gateway)
		}
		a.sets = append(a.sets, newRangeSet(i, spans))
	}
	if err := os.MkdirAll(filepath.Join(a.dir, indexDir), 0o700); err != nil {
		return nil, fmt.Errorf("ipam: create store %s: %w", a.dir, err)
	}
	return a, nil
}

// OpenStore opens an existing store for the calls that need no range sets
// (Get, Owner, Release): DEL of a config whose ipam section no longer
// validates still finds and frees the attachment's addresses by owner.
// A store that does not exist holds nothing: (nil, nil).
func OpenStore(dataDir, network string) (*Allocator, error) {
	if dataDir == "" {
		dataDir = DefaultDataDir
	}
	if network == "" || network == "." || network == ".." || strings.ContainsAny(network, "/\x00") {
		return nil, fmt.Errorf("ipam: network name %q cannot name a store directory", network)
	}
	dir := filepath.Join(dataDir, network)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("ipam: open store %s: %w", dir, err)
	}
	return &Allocator{LockTimeout: DefaultLockTimeout, dir: dir, storeOnly: true}, nil
}

// Dir returns the store directory.
func (a *Allocator) Dir() string { return a.dir }

func checkAttachment(o Attachment) error {
	if o.ContainerID == "" || o.IfName == "" {
		return fmt.Errorf("ipam: attachment %q/%q: container ID and interface name are required", o.ContainerID, o.IfName)
	}
	return nil
}

func (a *Allocator) setOf(ip netip.Addr) int {
	for i := range a.sets {
		if a.sets[i].spanOf(ip) >= 0 {
			return i
		}
	}
	return -1
}

// held returns the addresses the attachment owns and whether its index vouched for them.
// Without an index, Get and Release scan the store (exhaustive); Allocate only looks at
// the round-robin hints, which is where a reservation interrupted before its index write
// sits unless another one came after it.
func (a *Allocator) held(o Attachment, scanIfNoIndex bool) ([]netip.Addr, bool, error) {
	if rec := a.readIndex(o); rec != nil {
		var ips []netip.Addr
		for _, s := range rec.IPs {
			ip, ok := parseIPName(s)
			if ok && !slices.Contains(ips, ip) && a.ownedBy(ip, o) {
				ips = append(ips, ip)
			}
		}
		return ips, true, nil
	}
	var ips []netip.Addr
	if scanIfNoIndex {
		entries, err := a.scan()
		if err != nil {
			return nil, false, err
		}
		for _, e := range entries {
			if e.state == ipOwned && e.owner == o {
				ips = append(ips, e.ip)
			}
		}
	} else {
		for i := range a.sets {
			hint := a.readHint(i)
			if hint.IsValid() && a.sets[i].spanOf(hint) >= 0 && a.ownedBy(hint, o) {
				ips = append(ips, hint)
			}
		}
	}
	a.sortBySet(ips)
	return ips, false, nil
}

func (a *Allocator) sortBySet(ips []netip.Addr) {
	slices.SortFunc(ips, func(x, y netip.Addr) int {
		return cmp.Or(cmp.Compare(uint(a.setOf(x)), uint(a.setOf(y))), x.Compare(y))
	})
}

// Allocate reserves one address from each range set for the attachment, in range-set
// order. It is idempotent: addresses the attachment already holds are returned again,
// and only missing sets get a new reservation. If any set is exhausted nothing new stays
// reserved and the error wraps ErrNoFreeAddress.
func (a *Allocator) Allocate(containerID, ifName string) ([]*current.IPConfig, error) {
	o := Attachment{ContainerID: containerID, IfName: ifName}
	if err := checkAttachment(o); err != nil {
		return nil, err
	}
	if a.storeOnly {
		return nil, errors.New("ipam: a store opened without its config cannot allocate")
	}
	// The owner file and its fsync, before the lock: under a busy disk an
	// fsync can take seconds, and every other ADD of the node waits for
	// the lock. Unused (the attachment holds its addresses already), it
	// is removed.
	tmp, err := a.writeOwnerTemp(o)
	if err != nil {
		return nil, fmt.Errorf("ipam: reserve for %s/%s: %w", containerID, ifName, err)
	}
	// All new address files of this call are hard links of one inode; nothing ever
	// writes to an address file after it is published, so sharing is harmless.
	defer os.Remove(tmp)
	l, err := a.lock()
	if err != nil {
		return nil, err
	}
	locked := true
	unlock := func() {
		if locked {
			locked = false
			l.Unlock()
		}
	}
	defer unlock()

	held, indexed, err := a.held(o, false)
	if err != nil {
		return nil, err
	}
	// Desired state: exactly one owned address per set. Keep what matches, free extras
	// (e.g. left over from an older config), reserve what is missing.
	chosen := make([]netip.Addr, len(a.sets))
	var extra []netip.Addr
	for _, ip := range held {
		if i := a.setOf(ip); i >= 0 && !chosen[i].IsValid() {
			chosen[i] = ip
		} else {
			extra = append(extra, ip)
		}
	}
	missing := slices.ContainsFunc(chosen, func(ip netip.Addr) bool { return !ip.IsValid() })
	if !missing && len(extra) == 0 && indexed {
		return a.ipConfigs(chosen), nil
	}

	var fresh []int // set indexes reserved by this call
	if missing {
		for i := range a.sets {
			if chosen[i].IsValid() {
				continue
			}
			ip, err := a.reserve(i, tmp)
			if err != nil {
				a.rollback(chosen, fresh)
				return nil, err
			}
			chosen[i] = ip
			fresh = append(fresh, i)
		}
		for _, i := range fresh {
			// A hint that fails to update only moves where the next search starts.
			_ = a.writeHint(i, chosen[i])
		}
	}
	if len(extra) > 0 {
		if err := a.removeIPs(extra); err != nil {
			return nil, err
		}
	}
	if err := a.writeIndex(o, chosen); err != nil {
		a.rollback(chosen, fresh)
		return nil, err
	}
	unlock()
	// The new names made durable after the lock: the fsync of a directory
	// can take seconds on a busy disk, and every other pod start of the
	// node would wait that long; other processes see the reservations
	// already (one page cache), so the lock need not cover it.
	if len(fresh) > 0 {
		if err := syncDir(a.dir); err != nil {
			_ = a.Release(containerID, ifName)
			return nil, fmt.Errorf("ipam: reserve for %s/%s: %w", containerID, ifName, err)
		}
	}
	return a.ipConfigs(chosen), nil
}

// reserve publishes the owner file tmp under the first free address of set i.
func (a *Allocator) reserve(i int, tmp string) (netip.Addr, error) {
	rs := &a.sets[i]
	var got netip.Addr
	var linkErr error
	rs.walk(a.readHint(i), a.gateways, func(ip netip.Addr) bool {
		err := os.Link(tmp, a.ipPath(ip))
		switch {
		case err == nil:
			got = ip
			return true
		case errors.Is(err, fs.ErrExist):
			return false
		default:
			linkErr = err
			return true
		}
	})
	if linkErr != nil {
		return netip.Addr{}, fmt.Errorf("ipam: range set %d (%s): %w", i, rs.label, linkErr)
	}
	if !got.IsValid() {
		return netip.Addr{}, fmt.Errorf("ipam: range set %d (%s): %w", i, rs.label, ErrNoFreeAddress)
	}
	return got, nil
}

// rollback frees the reservations of a failed Allocate; the addresses are ours because
// we created them under the lock we still hold.
func (a *Allocator) rollback(chosen []netip.Addr, fresh []int) {
	for _, i := range fresh {
		os.Remove(a.ipPath(chosen[i]))
	}
	if len(fresh) > 0 {
		syncDir(a.dir)
	}
}

func (a *Allocator) removeIPs(ips []netip.Addr) error {
	for _, ip := range ips {
		if err := os.Remove(a.ipPath(ip)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("ipam: release %s: %w", ip, err)
		}
	}
	if len(ips) == 0 {
		return nil
	}
	if err := syncDir(a.dir); err != nil {
		return fmt.Errorf("ipam: release: %w", err)
	}
	return nil
}

func (a *Allocator) ipConfigs(ips []netip.Addr) []*current.IPConfig {
	out := make([]*current.IPConfig, len(ips))
	for i, ip := range ips {
		s := a.sets[i].spans[a.sets[i].spanOf(ip)]
		out[i] = &current.IPConfig{
			Address: net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(s.prefix.Bits(), ip.BitLen())},
			Gateway: s.gateway.AsSlice(),
		}
	}
	return out
}

// Get returns the addresses held by the attachment, nil if none.
func (a *Allocator) Get(containerID, ifName string) ([]net.IP, error) {
	o := Attachment{ContainerID: containerID, IfName: ifName}
	if err := checkAttachment(o); err != nil {
		return nil, err
	}
	l, err := a.lock()
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	held, _, err := a.held(o, true)
	if err != nil || len(held) == 0 {
		return nil, err
	}
	out := make([]net.IP, len(held))
	for i, ip := range held {
		out[i] = ip.AsSlice()
	}
	return out, nil
}

// Owner returns the attachment that holds ip; ok is false when the address
// is free or its owner cannot be read.
func (a *Allocator) Owner(ip net.IP) (o Attachment, ok bool) {
	addr, valid := netip.AddrFromSlice(ip)
	if !valid {
		return Attachment{}, false
	}
	o, st := a.readOwner(addr.Unmap())
	return o, st == ipOwned
}

// Release frees everything the attachment holds; releasing nothing is not an error.
// Address files go first and the index last, so a crash in between leaves an index
// whose addresses fail the ownership check, never an address without a way to find it.
func (a *Allocator) Release(containerID, ifName string) error {
	o := Attachment{ContainerID: containerID, IfName: ifName}
	if err := checkAttachment(o); err != nil {
		return err
	}
	l, err := a.lock()
	if err != nil {
		return err
	}
	defer l.Unlock()
	held, _, err := a.held(o, true)
	if err != nil {
		return err
	}
	if err := a.removeIPs(held); err != nil {
		return fmt.Errorf("ipam: release %s/%s: %w", containerID, ifName, err)
	}
	return a.removeIndex(o)
}

// GC releases every reservation whose attachment is not in valid and returns those
// attachments. It also rebuilds missing or wrong indexes of valid attachments and removes
// leftovers of crashed calls. Address files whose owner cannot be read stay reserved:
// handing them out could give a live pod's address away.
func (a *Allocator) GC(valid []Attachment) ([]Attachment, error) {
	keep := make(map[Attachment]bool, len(valid))
	for _, v := range valid {
		keep[v] = true
	}
	l, err := a.lock()
	if err != nil {
		return nil, err
	}
	defer l.Unlock()

	entries, err := a.scan()
	if err != nil {
		return nil, err
	}
	kept := map[Attachment][]netip.Addr{}
	freed := map[Attachment]bool{}
	var drop []netip.Addr
	for _, e := range entries {
		switch {
		case e.state != ipOwned:
		case keep[e.owner]:
			kept[e.owner] = append(kept[e.owner], e.ip)
		default:
			drop = append(drop, e.ip)
			freed[e.owner] = true
		}
	}
	if err := a.removeIPs(drop); err != nil {
		return nil, fmt.Errorf("ipam: gc: %w", err)
	}
	if err := a.gcIndexes(kept); err != nil {
		return nil, err
	}
	// Temporary files: an index's is written under the lock we hold, an
	// owner file just before an Allocate takes it. One older than a minute
	// is a leftover of a crashed process.
	for _, dir := range []string{a.dir, filepath.Join(a.dir, indexDir)} {
		names, _ := filepath.Glob(filepath.Join(dir, tmpPrefix+"*"))
		for _, n := range names {
			if fi, err := os.Lstat(n); err == nil && time.Since(fi.ModTime()) > staleTemp {
				os.Remove(n)
			}
		}
	}
	out := make([]Attachment, 0, len(freed))
	for o := range freed {
		out = append(out, o)
	}
	slices.SortFunc(out, func(x, y Attachment) int {
		return cmp.Or(cmp.Compare(x.ContainerID, y.ContainerID), cmp.Compare(x.IfName, y.IfName))
	})
	return out, nil
}

// staleTemp is the age from which GC removes a temporary file.
const staleTemp = time.Minute

// gcIndexes makes the index directory match the address files: one correct index per
// attachment that still holds addresses, nothing else.
func (a *Allocator) gcIndexes(kept map[Attachment][]netip.Addr) error {
	dir := filepath.Join(a.dir, indexDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("ipam: gc: %w", err)
	}
	good := map[Attachment]bool{}
	removed := false
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		data, err := readSmall(filepath.Join(dir, e.Name()))
		var rec indexRecord
		ok := err == nil && e.Type().IsRegular() && jsonInto(data, &rec)
		o := Attachment{ContainerID: rec.ContainerID, IfName: rec.IfName}
		if ok && indexName(o) == e.Name() && sameIPs(rec.IPs, kept[o]) && len(kept[o]) > 0 {
			good[o] = true
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("ipam: gc: %w", err)
		}
		removed = true
	}
	if removed {
		if err := syncDir(dir); err != nil {
			return fmt.Errorf("ipam: gc: %w", err)
		}
	}
	for o, ips := range kept {
		if good[o] {
			continue
		}
		a.sortBySet(ips)
		if err := a.writeIndex(o, ips); err != nil {
			return fmt.Errorf("ipam: gc: %w", err)
		}
	}
	return nil
}

func sameIPs(names []string, ips []netip.Addr) bool {
	if len(names) != len(ips) {
		return false
	}
	for _, n := range names {
		ip, ok := parseIPName(n)
		if !ok || !slices.Contains(ips, ip) {
			return false
		}
	}
	return true
}

// Status returns a *types.Error with code types.ErrPluginNotAvailable when some range
// set has no free address.
func (a *Allocator) Status() error {
	usage, err := a.Usage()
	if err != nil {
		return err
	}
	for _, u := range usage {
		if u.Used >= u.Total {
			return types.NewError(types.ErrPluginNotAvailable,
				fmt.Sprintf("ipam: range set %d (%s): no free address (%d of %d used)",
					u.Set, a.sets[u.Set].label, u.Used, u.Total), "")
		}
	}
	return nil
}

// Usage reports, per range set, how many addresses can be allocated in total and how
// many are reserved. It reads only file names.
func (a *Allocator) Usage() ([]RangeUsage, error) {
	l, err := a.lock()
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	entries, err := os.ReadDir(a.dir)
	if err != nil {
		return nil, fmt.Errorf("ipam: usage of store %s: %w", a.dir, err)
	}
	out := make([]RangeUsage, len(a.sets))
	for i := range a.sets {
		rs := &a.sets[i]
		out[i] = RangeUsage{Set: i, Total: rs.allocatable(a.gateways)}
		for _, s := range rs.spans {
			out[i].Subnets = append(out[i].Subnets, s.prefix.String())
		}
	}
	for _, e := range entries {
		ip, ok := parseIPName(e.Name())
		if !ok {
			continue
		}
		i := a.setOf(ip)
		if i < 0 {
			continue
		}
		rs := &a.sets[i]
		if !skip(&rs.spans[rs.spanOf(ip)], ip, a.gateways) {
			out[i].Used++
		}
	}
	return out, nil
}
