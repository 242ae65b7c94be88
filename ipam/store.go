package ipam

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/atomicfile"
	"github.com/qoscni/qoscni/internal/flock"
)

const (
	lockName    = "lock"
	indexDir    = "attachments"
	hintPrefix  = "last_reserved_ip."
	tmpPrefix   = atomicfile.TempPrefix
	maxFileRead = 4096 // owner records are tiny; never slurp a foreign huge file
)

// indexRecord is the content of attachments/<name>.
type indexRecord struct {
	ContainerID string   `json:"containerID"`
	IfName      string   `json:"ifName"`
	IPs         []string `json:"ips"`
}

// lock takes the store's flock, waiting at most LockTimeout: a stuck holder turns into
// a retryable CNI error instead of a hung pod start.
func (a *Allocator) lock() (*flock.Lock, error) {
	l, err := flock.Exclusive(filepath.Join(a.dir, lockName), a.LockTimeout, "ipam: store "+a.dir)
	var busy *types.Error
	if err != nil && !errors.As(err, &busy) {
		err = fmt.Errorf("ipam: lock store %s: %w", a.dir, err)
	}
	return l, err
}

func (a *Allocator) ipPath(ip netip.Addr) string { return filepath.Join(a.dir, ip.String()) }

func (a *Allocator) indexPath(o Attachment) string {
	return filepath.Join(a.dir, indexDir, indexName(o))
}

// indexName maps an attachment to a file name that is unambiguous ("_" only as the
// separator), never hidden or special, and short enough for any file system.
func indexName(o Attachment) string {
	name := escapeName(o.ContainerID) + "_" + escapeName(o.IfName)
	if len(name) > 200 {
		sum := sha256.Sum256([]byte(o.ContainerID + "\x00" + o.IfName))
		name = name[:100] + "~" + hex.EncodeToString(sum[:16])
	}
	return name
}

func escapeName(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		safe := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' && i > 0
		if safe {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// parseIPName accepts only canonical address file names, so foreign files such as
// "010.0.0.1" or "fe80::1%eth0" are ignored rather than misread.
func parseIPName(name string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(name)
	if err != nil || a.Zone() != "" || a.String() != name {
		return netip.Addr{}, false
	}
	return a, true
}

// openRaw is atomicfile.Open: raw system calls on every pod start's path.
var openRaw = atomicfile.Open

func readSmall(path string) ([]byte, error) {
	fd, err := openRaw(path, unix.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	buf := make([]byte, maxFileRead)
	n := 0
	for n < len(buf) {
		m, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if m == 0 {
			break
		}
		n += m
	}
	return buf[:n], nil
}

// ownerState is what an address file says about its address.
type ownerState int

const (
	ipFree    ownerState = iota // no file
	ipOwned                     // file names an owner
	ipUnknown                   // file exists but its owner cannot be read: used, never freed
)

func (a *Allocator) readOwner(ip netip.Addr) (Attachment, ownerState) {
	data, err := readSmall(a.ipPath(ip))
	if errors.Is(err, fs.ErrNotExist) {
		return Attachment{}, ipFree
	}
	if err != nil {
		return Attachment{}, ipUnknown
	}
	o, ok := parseOwner(data)
	if !ok {
		return Attachment{}, ipUnknown
	}
	return o, ipOwned
}

func parseOwner(data []byte) (Attachment, bool) {
	var o Attachment
	if json.Unmarshal(data, &o) != nil || o.ContainerID == "" || o.IfName == "" {
		return Attachment{}, false
	}
	return o, true
}

func (a *Allocator) ownedBy(ip netip.Addr, o Attachment) bool {
	got, st := a.readOwner(ip)
	return st == ipOwned && got == o
}

// readIndex returns the attachment's index, or nil when it is missing, unreadable or
// names another owner; callers then fall back to the address files, which are the truth.
func (a *Allocator) readIndex(o Attachment) *indexRecord {
	data, err := readSmall(a.indexPath(o))
	if err != nil {
		return nil
	}
	var rec indexRecord
	if json.Unmarshal(data, &rec) != nil || rec.ContainerID != o.ContainerID || rec.IfName != o.IfName {
		return nil
	}
	return &rec
}

func (a *Allocator) writeIndex(o Attachment, ips []netip.Addr) error {
	rec := indexRecord{ContainerID: o.ContainerID, IfName: o.IfName, IPs: make([]string, len(ips))}
	for i, ip := range ips {
		rec.IPs[i] = ip.String()
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	dir := filepath.Join(a.dir, indexDir)
	// The index is a cache: Get and Release fall back to scanning the
	// address files when it is missing or unreadable, and GC rebuilds it,
	// so it is not worth two fsyncs on every pod start.
	if err := writeVolatile(filepath.Join(dir, indexName(o)), append(data, '\n')); err != nil {
		return fmt.Errorf("ipam: write index of %s/%s: %w", o.ContainerID, o.IfName, err)
	}
	return nil
}

func (a *Allocator) removeIndex(o Attachment) error {
	err := os.Remove(a.indexPath(o))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("ipam: remove index of %s/%s: %w", o.ContainerID, o.IfName, err)
	}
	return nil
}

func (a *Allocator) readHint(set int) netip.Addr {
	data, err := readSmall(filepath.Join(a.dir, fmt.Sprintf("%s%d", hintPrefix, set)))
	if err != nil {
		return netip.Addr{}
	}
	// A hint in any other form (a zone, a non-canonical spelling) would
	// start the walk outside the names reservations are stored under.
	ip, ok := parseIPName(strings.TrimSpace(string(data)))
	if !ok {
		return netip.Addr{}
	}
	return ip
}

// writeHint is not fsynced: a lost hint only restarts the round-robin elsewhere.
func (a *Allocator) writeHint(set int, ip netip.Addr) error {
	return writeVolatile(filepath.Join(a.dir, fmt.Sprintf("%s%d", hintPrefix, set)), []byte(ip.String()+"\n"))
}

// writeVolatile replaces path through a temporary file and a rename, so
// readers see the old or the new content, never a torn one; without
// fsyncs, for the files a crash may lose (index, hints).
func writeVolatile(path string, data []byte) error {
	_, err := atomicfile.Write(path, data, atomicfile.Options{Perm: 0o600, Volatile: true})
	return err
}

// writeOwnerTemp writes the owner record of a reservation to a fsynced temporary file
// that reserve links into place. Its directory is not synced here: the
// links are, after the lock (Allocate).
func (a *Allocator) writeOwnerTemp(o Attachment) (string, error) {
	data, err := json.Marshal(o)
	if err != nil {
		return "", err
	}
	return atomicfile.Temp(a.dir, append(data, '\n'), atomicfile.Options{Perm: 0o600})
}

// syncDir makes the links and removals of dir survive a crash.
func syncDir(dir string) error { return atomicfile.SyncDir(dir) }

// ipEntry is one address file found by a scan.
type ipEntry struct {
	ip    netip.Addr
	owner Attachment
	state ownerState
}

// scan reads every address file. Only GC, and Get/Release without an index, pay for it.
func (a *Allocator) scan() ([]ipEntry, error) {
	entries, err := os.ReadDir(a.dir)
	if err != nil {
		return nil, fmt.Errorf("ipam: scan store %s: %w", a.dir, err)
	}
	var out []ipEntry
	for _, e := range entries {
		ip, ok := parseIPName(e.Name())
		if !ok {
			continue
		}
		if !e.Type().IsRegular() {
			out = append(out, ipEntry{ip: ip, state: ipUnknown})
			continue
		}
		o, st := a.readOwner(ip)
		if st == ipFree {
			continue
		}
		out = append(out, ipEntry{ip: ip, owner: o, state: st})
	}
	return out, nil
}

func jsonInto(data []byte, v any) bool { return json.Unmarshal(data, v) == nil }
