// Package state keeps one durable record per attachment (container ID +
// interface name). The plugin writes it on ADD and removes it on DEL; the
// node agent reads it to know which pod owns which devices.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/atomicfile"
	"github.com/qoscni/qoscni/internal/flock"
)

// SchemaVersion is bumped when Record changes incompatibly.
const SchemaVersion = 1

// Mode says how an attachment was wired.
type Mode string

const (
	ModeStandalone Mode = "standalone"
	ModeChained    Mode = "chained"
)

// Pod is the identity the runtime passed in CNI_ARGS.
type Pod struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// Record describes one attachment.
type Record struct {
	Schema      int      `json:"schema"`
	Network     string   `json:"network"`
	ContainerID string   `json:"containerID"`
	IfName      string   `json:"ifName"`
	Netns       string   `json:"netns,omitempty"`
	Pod         Pod      `json:"pod"`
	Mode        Mode     `json:"mode"`
	Bridge      string   `json:"bridge,omitempty"`
	HostVeth    string   `json:"hostVeth"`
	PodMAC      string   `json:"podMAC,omitempty"`
	MTU         int      `json:"mtu,omitempty"`
	IPs         []string `json:"ips,omitempty"` // CIDR notation, pod side
	Gateways    []string `json:"gateways,omitempty"`
	IPMasq      bool     `json:"ipMasq,omitempty"`
	Shaping     *Shaping `json:"shaping,omitempty"`
	// ShapingDefaults are the plugin config's shaping inputs at ADD, so the
	// agent can re-resolve a pod's shaping when its annotations change.
	ShapingDefaults *ShapingDefaults `json:"shapingDefaults,omitempty"`
	Ports           []Port           `json:"ports,omitempty"`
	// Controls are the pod's packet-rate, connection and DSCP controls,
	// kept in nftables by pod address (nil: none).
	Controls *Controls `json:"controls,omitempty"`
	Created  time.Time `json:"created"`
	Updated  time.Time `json:"updated,omitempty"`
	// Provisional marks the record a standalone ADD writes before its first
	// change to the kernel or the IPAM store, replaced by the full record
	// when it succeeds. One left behind is an ADD that was killed half
	// way: DEL, GC and the agent tear it down as they would without a
	// record (addresses from the IPAM store, hostPorts by owner), and
	// nothing else acts on it.
	Provisional bool `json:"provisional,omitempty"`
}

// Controls are per-pod controls that tc cannot express: packet rate and
// concurrent connections per direction, and DSCP marking of the egress.
type Controls struct {
	Ingress *ControlDirection `json:"ingress,omitempty"`
	Egress  *ControlDirection `json:"egress,omitempty"`
	// DSCP is the code point written into every packet the pod sends
	// (nil: left as the pod set it).
	DSCP *uint8 `json:"dscp,omitempty"`
}

// Empty reports whether no control is set.
func (c *Controls) Empty() bool {
	return c == nil || (c.Ingress.Empty() && c.Egress.Empty() && c.DSCP == nil)
}

// ControlDirection is one direction's controls; 0 means unset.
type ControlDirection struct {
	// PacketRate in packets per second, with a bucket of PacketBurst
	// packets.
	PacketRate  uint64 `json:"packetRate,omitempty"`
	PacketBurst uint32 `json:"packetBurst,omitempty"`
	// MaxConnections bounds the connections open at once: opened by the
	// pod (egress) or to it (ingress).
	MaxConnections uint32 `json:"maxConnections,omitempty"`
}

// Empty reports whether the direction has no control.
func (d *ControlDirection) Empty() bool {
	return d == nil || (d.PacketRate == 0 && d.MaxConnections == 0)
}

// Shaping is the traffic shaping applied to an attachment; nil or an empty
// direction means that direction is not shaped.
type Shaping struct {
	// Ingress is traffic into the pod, shaped at the root of the host veth.
	Ingress *Direction `json:"ingress,omitempty"`
	// Egress is traffic out of the pod, redirected from the host veth's
	// ingress hook to the IFB device and shaped at the IFB's root.
	Egress *Direction `json:"egress,omitempty"`
	// IFB is the attachment's IFB device ("" when egress is not shaped).
	IFB string `json:"ifb,omitempty"`
	// Guarantee is the pod's share of the node's guaranteed-bandwidth
	// hierarchies (nil: the node has none, or the record predates them).
	Guarantee *Guarantee `json:"guarantee,omitempty"`
}

// Guarantee is a pod's class in each direction's node-wide hierarchy.
type Guarantee struct {
	// Minor is the pod's HTB class minor on the node, the same in both
	// directions.
	Minor uint16 `json:"minor"`
	// Ingress and Egress are nil where the node has no capacity.
	Ingress *GuaranteeDirection `json:"ingress,omitempty"`
	Egress  *GuaranteeDirection `json:"egress,omitempty"`
}

// GuaranteeDirection is one class's parameters.
type GuaranteeDirection struct {
	// RequestBits is the guaranteed rate in bit/s (0: best effort).
	RequestBits uint64 `json:"requestBits"`
	// CeilBits is the most the pod may reach by borrowing, in bit/s.
	CeilBits uint64 `json:"ceilBits"`
	// Priority orders borrowing: "high", "normal" or "low".
	Priority    string `json:"priority"`
	BurstBytes  uint64 `json:"burstBytes"`
	CburstBytes uint64 `json:"cburstBytes"`
	QueueBytes  uint64 `json:"queueBytes"`
	// MaxQueueDelayNs is the budget QueueBytes was derived from.
	MaxQueueDelayNs int64 `json:"maxQueueDelayNs"`
	// Clamped lists the settings a ceiling cut down.
	Clamped []Clamp `json:"clamped,omitempty"`
}

// ShapingDefaults mirror the plugin config keys (bit/s, bits), parsed.
// Records written before MaxQueueDelayNs existed carry the delay as the
// config's string ("maxQueueDelay"); UnmarshalJSON reads both.
type ShapingDefaults struct {
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
	// MaxQueueDelayNs is the config's maxQueueDelay (0: the default budget).
	MaxQueueDelayNs int64 `json:"maxQueueDelayNs,omitempty"`
	// Ceilings are the config's bounds on pod-supplied sizes (nil: the
	// defaults of the plugin that reads the record).
	Ceilings *Ceilings `json:"ceilings,omitempty"`
	// NodeCapacity is the config's nodeCapacity (nil: no guarantees).
	NodeCapacity *NodeCapacity `json:"nodeCapacity,omitempty"`
}

// NodeCapacity mirrors the plugin config's "nodeCapacity", parsed (bit/s,
// 0: no hierarchy in that direction).
type NodeCapacity struct {
	IngressBits uint64 `json:"ingressBits,omitempty"`
	EgressBits  uint64 `json:"egressBits,omitempty"`
}

// Ceilings mirror the plugin config's "ceilings" object, parsed.
type Ceilings struct {
	MaxQueueDelayNs int64  `json:"maxQueueDelayNs,omitempty"`
	MaxBurstBits    uint64 `json:"maxBurstBits,omitempty"`
	MaxQueueBytes   uint64 `json:"maxQueueBytes,omitempty"`
	MaxRequestBits  uint64 `json:"maxRequestBits,omitempty"`
}

// ClampQueueDelay is the Clamp.Setting of the queueing-delay budget, the
// one setting counted in nanoseconds.
const ClampQueueDelay = "queue_delay"

// Clamp records a setting a ceiling cut down: what was asked, what the
// kernel got (nanoseconds for queue_delay, bit/s for request, bytes for
// burst, cburst and queue_limit).
type Clamp struct {
	Setting   string `json:"setting"`
	Requested uint64 `json:"requested"`
	Applied   uint64 `json:"applied"`
}

// Direction is one direction's effective shaping parameters.
type Direction struct {
	// Device carries the shaping qdisc at its root.
	Device string `json:"device"`
	// RateBits is the limit in bit/s.
	RateBits uint64 `json:"rateBits"`
	// BurstBits is the token bucket depth in bits.
	BurstBits uint64 `json:"burstBits"`
	// LimitBytes bounds the queue.
	LimitBytes uint64 `json:"limitBytes"`
	// MaxQueueDelayNs is the queueing-delay budget the limit was derived from.
	MaxQueueDelayNs int64 `json:"maxQueueDelayNs"`
	// Source says which input won: "annotation", "runtimeConfig" or "config".
	Source string `json:"source"`
	// Clamped lists the settings a ceiling cut down.
	Clamped []Clamp `json:"clamped,omitempty"`
	// PeakBits and MinBurstBytes are the pod's own token-bucket peak rate
	// and its bucket (0: none / one frame).
	PeakBits      uint64 `json:"peakBits,omitempty"`
	MinBurstBytes uint64 `json:"minBurstBytes,omitempty"`
}

// Port is one hostPort mapping held by an attachment.
type Port struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
	PodIP         string `json:"podIP"`
}

// Key identifies a record.
type Key struct {
	Network     string
	ContainerID string
	IfName      string
}

func (r *Record) Key() Key { return Key{r.Network, r.ContainerID, r.IfName} }

// Addrs are the attachment's addresses without their prefixes (an entry
// that does not parse is left out).
func (r *Record) Addrs() []net.IP {
	var out []net.IP
	for _, c := range r.IPs {
		if ip, _, err := net.ParseCIDR(c); err == nil {
			out = append(out, ip)
		}
	}
	return out
}

// PodAddrs are the attachment's addresses without their prefixes, for
// what must key on every one of them (nftables elements): an entry that
// does not parse is an error naming it.
func (r *Record) PodAddrs() ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range r.IPs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("address %q of %s/%s: %w", s, r.ContainerID, r.IfName, err)
		}
		out = append(out, p.Addr())
	}
	return out, nil
}

// DefaultLockTimeout bounds the wait for a network's lock, as
// ipam.DefaultLockTimeout does for the address store.
const DefaultLockTimeout = 30 * time.Second

// Store is a directory of records: <dir>/<network>/<containerID>_<ifname>.json,
// each part escaped (see FileName).
type Store struct {
	Dir string
	// LockTimeout bounds the wait for a network's lock (New sets
	// DefaultLockTimeout); zero or negative means a single attempt.
	LockTimeout time.Duration
}

// New returns a store rooted at dir; directories are created on first write.
func New(dir string) *Store { return &Store{Dir: dir, LockTimeout: DefaultLockTimeout} }

func (s *Store) netDir(network string) string { return filepath.Join(s.Dir, dirName(network)) }

func (s *Store) path(k Key) string {
	return filepath.Join(s.netDir(k.Network), FileName(k.ContainerID, k.IfName))
}

// Path is where the attachment's record is (or would be) stored.
func (s *Store) Path(k Key) string { return s.path(k) }

// Save writes the record atomically: a crash leaves either the old or the
// new record, never a torn one. It takes no lock: records are written
// whole (a rename), only by the ADD of their attachment, which the runtime
// never runs beside a DEL of it; the lock orders the agent's Update
// against Delete.
func (s *Store) Save(r *Record) error { return s.save(r, true) }

// SaveProvisional writes ADD's provisional record without the fsyncs: a
// machine crash takes the kernel objects it stands for with it, and a
// plain kill of the plugin keeps what it wrote.
func (s *Store) SaveProvisional(r *Record) error {
	r.Provisional = true
	return s.save(r, false)
}

func (s *Store) save(r *Record, durable bool) error {
	r.Schema = SchemaVersion
	dir := s.netDir(r.Network)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state dir %s: %w", dir, err)
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state for %s/%s: %w", r.ContainerID, r.IfName, err)
	}
	_, err = atomicfile.Write(s.path(r.Key()), data, atomicfile.Options{Perm: 0o600, Volatile: !durable})
	return err
}

// Load returns the record, or (nil, nil) when there is none.
func (s *Store) Load(k Key) (*Record, error) {
	p := s.path(k)
	data, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state for %s/%s: %w", k.ContainerID, k.IfName, err)
	}
	r, err := Decode(data)
	if err != nil {
		// The path, so that whoever reads the error can look at the file.
		return nil, fmt.Errorf("state for %s/%s in %s: %w", k.ContainerID, k.IfName, p, err)
	}
	return r, nil
}

// Decode parses one record and checks the fields every consumer relies on.
func Decode(data []byte) (*Record, error) {
	r := &Record{}
	if err := json.Unmarshal(data, r); err != nil {
		return nil, fmt.Errorf("decode record: %w", err)
	}
	if r.Schema != SchemaVersion {
		return nil, fmt.Errorf("decode record: schema %d, want %d", r.Schema, SchemaVersion)
	}
	if r.ContainerID == "" || r.IfName == "" || r.Network == "" {
		return nil, errors.New("decode record: network, containerID and ifName are required")
	}
	return r, nil
}

// ErrNoRecord is returned by Update when the attachment has no record.
var ErrNoRecord = errors.New("no state record")

// Update changes an existing record under the network's lock, so a writer
// that raced with DEL never brings a deleted record back.
func (s *Store) Update(k Key, change func(*Record) error) error {
	unlock, err := s.lock(k.Network)
	if err != nil {
		return err
	}
	defer unlock()
	r, err := s.Load(k)
	if err != nil {
		return err
	}
	if r == nil {
		return ErrNoRecord
	}
	if err := change(r); err != nil {
		return err
	}
	r.Updated = time.Now().UTC()
	return s.save(r, true)
}

// lock takes the network's lock file (flock, released with the process),
// waiting at most LockTimeout: a stuck holder turns into a retryable CNI
// error (11) instead of a hung pod start or teardown.
func (s *Store) lock(network string) (func(), error) {
	dir := s.netDir(network)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", dir, err)
	}
	path := filepath.Join(dir, ".lock")
	l, err := flock.Exclusive(path, s.LockTimeout, "state: "+path)
	var busy *types.Error
	if errors.As(err, &busy) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("lock state of %s: %w", network, err)
	}
	return l.Unlock, nil
}

// Delete removes the record; a missing record is not an error.
func (s *Store) Delete(k Key) error {
	unlock, err := s.lock(k.Network)
	if err != nil {
		return err
	}
	defer unlock()
	err = os.Remove(s.path(k))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove state for %s/%s: %w", k.ContainerID, k.IfName, err)
	}
	return nil
}

// BadFile is a file in the store that could not be decoded.
type BadFile struct {
	Path string
	Err  error
}

// Entry is one decodable record file.
type Entry struct {
	Path   string
	Record *Record
	// Store is the store the file was found in: the one whose locks and
	// paths changing or deleting the record must use.
	Store *Store
	// Misplaced: the record is not stored where its network, container ID
	// and interface name say it should be (a copy, or a file an operator
	// moved). Acting on it would act on another attachment, maybe of
	// another network.
	Misplaced bool
}

// List returns every decodable record of a network ("" = all networks) and
// the files that could not be decoded, so callers can report and GC them.
// It includes misplaced records; Entries tells them apart.
func (s *Store) List(network string) ([]*Record, []BadFile, error) {
	entries, bad, err := s.Entries(network)
	if err != nil {
		return nil, nil, err
	}
	var recs []*Record
	for _, e := range entries {
		recs = append(recs, e.Record)
	}
	return recs, bad, nil
}

// Entries is List with each record's file, and whether the record is
// misplaced.
func (s *Store) Entries(network string) ([]Entry, []BadFile, error) {
	var dirs []string
	if network != "" {
		dirs = []string{s.netDir(network)}
	} else {
		entries, err := os.ReadDir(s.Dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, nil
		}
		if err != nil {
			return nil, nil, fmt.Errorf("list state dir %s: %w", s.Dir, err)
		}
		for _, e := range entries {
			if e.IsDir() {
				dirs = append(dirs, filepath.Join(s.Dir, e.Name()))
			}
		}
	}
	var out []Entry
	var bad []BadFile
	for _, d := range dirs {
		entries, err := os.ReadDir(d)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("list state dir %s: %w", d, err)
		}
		for _, e := range entries {
			if e.IsDir() || !strings.HasSuffix(e.Name(), recordSuffix) {
				continue
			}
			p := filepath.Join(d, e.Name())
			data, err := os.ReadFile(p)
			if err != nil {
				bad = append(bad, BadFile{p, err})
				continue
			}
			r, err := Decode(data)
			if err != nil {
				bad = append(bad, BadFile{p, err})
				continue
			}
			out = append(out, Entry{Path: p, Record: r, Store: s, Misplaced: p != s.path(r.Key())})
		}
	}
	return out, bad, nil
}
