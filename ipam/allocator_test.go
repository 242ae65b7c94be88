package ipam

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"golang.org/x/sys/unix"
)

// newTestAllocator builds an allocator over a fresh store; each set is "subnet" or
// "subnet,start,end".
func newTestAllocator(t testing.TB, dataDir string, sets ...string) *Allocator {
	t.Helper()
	c := &Config{DataDir: dataDir}
	for _, s := range sets {
		f := strings.Split(s, ",")
		n, err := types.ParseCIDR(f[0])
		if err != nil {
			t.Fatal(err)
		}
		r := Range{Subnet: types.IPNet(*n)}
		if len(f) == 3 {
			r.RangeStart, r.RangeEnd = net.ParseIP(f[1]), net.ParseIP(f[2])
		}
		c.Ranges = append(c.Ranges, RangeSet{r})
	}
	a, err := New(c, "net1")
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func mustAllocate(t testing.TB, a *Allocator, id, ifName string) []string {
	t.Helper()
	cfgs, err := a.Allocate(id, ifName)
	if err != nil {
		t.Fatalf("allocate %s/%s: %v", id, ifName, err)
	}
	return addrs(cfgs)
}

func addrs(cfgs []*current.IPConfig) []string {
	out := make([]string, len(cfgs))
	for i, c := range cfgs {
		out[i] = c.Address.String()
	}
	return out
}

func ipStrings(ips []net.IP) []string {
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = ip.String()
	}
	return out
}

func TestAllocateGetRelease(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "10.22.0.0/24")
	cfgs, err := a.Allocate("c1", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfgs) != 1 || cfgs[0].Address.String() != "10.22.0.2/24" || cfgs[0].Gateway.String() != "10.22.0.1" || cfgs[0].Interface != nil {
		t.Fatalf("got %+v", cfgs[0])
	}
	if len(cfgs[0].Address.IP) != net.IPv4len {
		t.Errorf("IPv4 address in %d-byte form", len(cfgs[0].Address.IP))
	}
	st, err := os.Stat(filepath.Join(dir, "net1", "10.22.0.2"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("address file: %v %v", st, err)
	}
	if st, err := os.Stat(filepath.Join(dir, "net1")); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("store dir: %v %v", st, err)
	}
	if got := mustAllocate(t, a, "c1", "eth0"); !slices.Equal(got, []string{"10.22.0.2/24"}) {
		t.Errorf("idempotent allocate = %v", got)
	}
	if got := mustAllocate(t, a, "c1", "eth1"); !slices.Equal(got, []string{"10.22.0.3/24"}) {
		t.Errorf("second interface = %v", got)
	}
	ips, err := a.Get("c1", "eth0")
	if err != nil || !slices.Equal(ipStrings(ips), []string{"10.22.0.2"}) {
		t.Errorf("get = %v, %v", ips, err)
	}
	if err := a.Release("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if ips, err := a.Get("c1", "eth0"); ips != nil || err != nil {
		t.Errorf("get after release = %v, %v", ips, err)
	}
	if err := a.Release("c1", "eth0"); err != nil {
		t.Errorf("second release: %v", err)
	}
	if err := a.Release("never", "eth0"); err != nil {
		t.Errorf("release of unknown: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "net1", "10.22.0.2")); !os.IsNotExist(err) {
		t.Errorf("address file still there: %v", err)
	}
	if _, err := a.Allocate("", "eth0"); err == nil {
		t.Error("empty container ID accepted")
	}
}

func TestDualStack(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/24", "fd00:22::/64")
	cfgs, err := a.Allocate("c1", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if got := addrs(cfgs); !slices.Equal(got, []string{"10.22.0.2/24", "fd00:22::2/64"}) {
		t.Fatalf("got %v", got)
	}
	if cfgs[1].Gateway.String() != "fd00:22::1" {
		t.Errorf("v6 gateway = %v", cfgs[1].Gateway)
	}
	if got := mustAllocate(t, a, "c2", "eth0"); !slices.Equal(got, []string{"10.22.0.3/24", "fd00:22::3/64"}) {
		t.Fatalf("got %v", got)
	}
	ips, _ := a.Get("c2", "eth0")
	if !slices.Equal(ipStrings(ips), []string{"10.22.0.3", "fd00:22::3"}) {
		t.Errorf("get = %v", ips)
	}
	u, err := a.Usage()
	if err != nil || len(u) != 2 || u[0].Total != 253 || u[0].Used != 2 || u[1].Used != 2 || u[1].Total < 1<<63 {
		t.Errorf("usage = %+v, %v", u, err)
	}
}

func TestRoundRobin(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/29") // hosts .2-.6 (.1 gateway, .7 broadcast)
	first := mustAllocate(t, a, "c1", "eth0")
	if err := a.Release("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	second := mustAllocate(t, a, "c2", "eth0")
	if slices.Equal(first, second) {
		t.Fatalf("released address %v handed out again at once", first)
	}
	// Walk around the range: the wrap must skip broadcast, network and gateway.
	var seen []string
	for i := 3; i <= 6; i++ {
		seen = append(seen, mustAllocate(t, a, fmt.Sprintf("c%d", i), "eth0")...)
	}
	want := []string{"10.22.0.4/29", "10.22.0.5/29", "10.22.0.6/29", "10.22.0.2/29"}
	if !slices.Equal(seen, want) {
		t.Errorf("round-robin order %v, want %v", seen, want)
	}
}

func TestMultiRangeSetWraps(t *testing.T) {
	c := &Config{DataDir: t.TempDir(), Ranges: []RangeSet{{
		{Subnet: mustNet(t, "10.22.0.0/24"), RangeStart: net.ParseIP("10.22.0.10"), RangeEnd: net.ParseIP("10.22.0.11")},
		{Subnet: mustNet(t, "10.23.0.0/24"), RangeStart: net.ParseIP("10.23.0.254"), RangeEnd: net.ParseIP("10.23.0.255")},
	}}}
	a, err := New(c, "n")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for i := range 3 {
		got = append(got, mustAllocate(t, a, fmt.Sprint("c", i), "eth0")...)
	}
	if want := []string{"10.22.0.10/24", "10.22.0.11/24", "10.23.0.254/24"}; !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v (10.23.0.255 is broadcast)", got, want)
	}
	if _, err := a.Allocate("c9", "eth0"); !errors.Is(err, ErrNoFreeAddress) {
		t.Fatalf("want exhaustion, got %v", err)
	}
	a.Release("c0", "eth0")
	if got := mustAllocate(t, a, "c9", "eth0"); got[0] != "10.22.0.10/24" {
		t.Errorf("wrap got %v", got)
	}
}

func mustNet(t *testing.T, s string) types.IPNet {
	n, err := types.ParseCIDR(s)
	if err != nil {
		t.Fatal(err)
	}
	return types.IPNet(*n)
}

func TestExhaustionAndStatus(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "fd00::/64", "10.22.0.0/30") // IPv4 set has one address: .2
	if err := a.Status(); err != nil {
		t.Fatalf("status before: %v", err)
	}
	mustAllocate(t, a, "c1", "eth0")
	var te *types.Error
	if err := a.Status(); !errors.As(err, &te) || te.Code != types.ErrPluginNotAvailable || !strings.Contains(te.Msg, "range set 1 (10.22.0.0/30)") {
		t.Fatalf("status when full = %v", err)
	}
	_, err := a.Allocate("c2", "eth0")
	if !errors.Is(err, ErrNoFreeAddress) || err.Error() != "ipam: range set 1 (10.22.0.0/30): no free address" {
		t.Fatalf("allocate when full = %v", err)
	}
	// Nothing of the failed call stays reserved, not even the IPv6 address.
	if u, _ := a.Usage(); u[0].Used != 1 {
		t.Errorf("IPv6 reservation leaked: %+v", u)
	}
	if ips, _ := a.Get("c2", "eth0"); ips != nil {
		t.Errorf("failed attachment holds %v", ips)
	}
	if err := a.Release("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := a.Status(); err != nil {
		t.Fatalf("status after release: %v", err)
	}
	if got := mustAllocate(t, a, "c2", "eth0"); got[1] != "10.22.0.2/30" {
		t.Errorf("after recovery got %v", got)
	}
}

func TestGC(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/24", "fd00::/64")
	for _, id := range []string{"a", "b", "c"} {
		mustAllocate(t, a, id, "eth0")
	}
	keepB := mustAllocate(t, a, "b", "eth0")
	os.Remove(a.indexPath(Attachment{"b", "eth0"})) // GC must rebuild it
	freed, err := a.GC([]Attachment{{"b", "eth0"}, {"zzz", "eth0"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := []Attachment{{"a", "eth0"}, {"c", "eth0"}}; !slices.Equal(freed, want) {
		t.Errorf("freed %v, want %v", freed, want)
	}
	if ips, _ := a.Get("a", "eth0"); ips != nil {
		t.Errorf("a still holds %v", ips)
	}
	if a.readIndex(Attachment{"b", "eth0"}) == nil {
		t.Error("index of b not rebuilt")
	}
	if got := mustAllocate(t, a, "b", "eth0"); !slices.Equal(got, keepB) {
		t.Errorf("b = %v, want %v", got, keepB)
	}
	if u, _ := a.Usage(); u[0].Used != 1 || u[1].Used != 1 {
		t.Errorf("usage after gc %+v", u)
	}
	entries, _ := os.ReadDir(filepath.Join(a.dir, indexDir))
	if len(entries) != 1 {
		t.Errorf("index dir holds %d entries, want 1", len(entries))
	}
}

func TestIndexMissingFallback(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/24", "fd00::/64")
	mustAllocate(t, a, "c1", "eth0")
	mustAllocate(t, a, "c2", "eth0")
	os.Remove(a.indexPath(Attachment{"c1", "eth0"}))
	ips, err := a.Get("c1", "eth0")
	if err != nil || !slices.Equal(ipStrings(ips), []string{"10.22.0.2", "fd00::2"}) {
		t.Fatalf("get by scan = %v, %v", ips, err)
	}
	if err := a.Release("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if ips, _ := a.Get("c1", "eth0"); ips != nil {
		t.Fatalf("still held after release by scan: %v", ips)
	}

	// A crash between the address files and the index of the latest reservation: the
	// retry finds the reservation through the round-robin hints instead of leaking it.
	want := mustAllocate(t, a, "c3", "eth0")
	os.Remove(a.indexPath(Attachment{"c3", "eth0"}))
	if got := mustAllocate(t, a, "c3", "eth0"); !slices.Equal(got, want) {
		t.Errorf("retry after lost index = %v, want %v", got, want)
	}
	if a.readIndex(Attachment{"c3", "eth0"}) == nil {
		t.Error("index not rewritten")
	}
}

func TestReleaseOnlyOwnFiles(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/24")
	mustAllocate(t, a, "c1", "eth0")
	mustAllocate(t, a, "c2", "eth0")
	// A stale or corrupted index of c1 that names c2's address must not free it.
	if err := a.writeIndex(Attachment{"c1", "eth0"}, mustAddrs("10.22.0.2", "10.22.0.3")); err != nil {
		t.Fatal(err)
	}
	if err := a.Release("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if ips, _ := a.Get("c2", "eth0"); !slices.Equal(ipStrings(ips), []string{"10.22.0.3"}) {
		t.Fatalf("c2 lost its address: %v", ips)
	}
}

func TestCorruptedStore(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/24")
	d := a.dir
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(d, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("10.22.0.2", "")                         // empty: used, owner unknown
	write("10.22.0.3", "\x00\xffgarbage")          // garbage: used
	write("10.22.0.4", `{"containerID":"x"`)       // truncated JSON: used
	os.Mkdir(filepath.Join(d, "10.22.0.5"), 0o700) // not even a file: used
	write("garbage name", "x")
	write("010.22.0.6", "x") // non-canonical name: ignored
	write(hintPrefix+"0", "not an ip")
	write(indexDir+"/c9_eth0", `{"containerID":"c9","ifName":"eth0","ips":["10.22`)
	write(indexDir+"/junk", "\x00")
	write(tmpPrefix+"dead", "leftover")
	// A leftover is old; a fresh one may be an Allocate about to take the lock.
	old := time.Now().Add(-2 * staleTemp)
	if err := os.Chtimes(filepath.Join(d, tmpPrefix+"dead"), old, old); err != nil {
		t.Fatal(err)
	}
	write(tmpPrefix+"fresh", "an owner file of an Allocate in flight")

	got := mustAllocate(t, a, "c1", "eth0")
	if !slices.Equal(got, []string{"10.22.0.6/24"}) {
		t.Fatalf("allocate over corrupted store = %v", got)
	}
	if ips, err := a.Get("c9", "eth0"); ips != nil || err != nil {
		t.Errorf("truncated index gave %v, %v", ips, err)
	}
	if err := a.Release("c9", "eth0"); err != nil {
		t.Errorf("release with truncated index: %v", err)
	}
	// An owned address whose index is truncated is still found by the scan.
	write(indexDir+"/"+indexName(Attachment{"c1", "eth0"}), `{"contai`)
	if ips, _ := a.Get("c1", "eth0"); !slices.Equal(ipStrings(ips), []string{"10.22.0.6"}) {
		t.Errorf("get with truncated index = %v", ips)
	}
	freed, err := a.GC(nil)
	if err != nil || !slices.Equal(freed, []Attachment{{"c1", "eth0"}}) {
		t.Fatalf("gc = %v, %v", freed, err)
	}
	for _, name := range []string{"10.22.0.2", "10.22.0.3", "10.22.0.4", "10.22.0.5", "garbage name"} {
		if _, err := os.Lstat(filepath.Join(d, name)); err != nil {
			t.Errorf("gc removed foreign %q: %v", name, err)
		}
	}
	if _, err := os.Lstat(filepath.Join(d, tmpPrefix+"fresh")); err != nil {
		t.Errorf("gc removed a fresh temp file: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(d, tmpPrefix+"dead")); !os.IsNotExist(err) {
		t.Errorf("gc kept temp file: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(d, indexDir)); len(entries) != 0 {
		t.Errorf("gc kept corrupt indexes: %v", entries)
	}
	u, _ := a.Usage()
	if u[0].Used != 4 {
		t.Errorf("used = %d, want 4 unknown-owner files", u[0].Used)
	}
	// Everything else still allocates, never one of the unknown ones.
	seen := map[string]bool{}
	for i := 0; ; i++ {
		cfgs, err := a.Allocate(fmt.Sprint("n", i), "eth0")
		if errors.Is(err, ErrNoFreeAddress) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		ip := cfgs[0].Address.IP.String()
		if seen[ip] || slices.Contains([]string{"10.22.0.2", "10.22.0.3", "10.22.0.4", "10.22.0.5"}, ip) {
			t.Fatalf("handed out %s twice or over a foreign file", ip)
		}
		seen[ip] = true
	}
	if len(seen) != 253-4 {
		t.Errorf("allocated %d addresses, want %d", len(seen), 253-4)
	}
}

func TestLockTimeout(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/24")
	f, err := os.OpenFile(filepath.Join(a.dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	a.LockTimeout = 50 * time.Millisecond
	start := time.Now()
	_, err = a.Allocate("c1", "eth0")
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrTryAgainLater {
		t.Fatalf("want code 11, got %v", err)
	}
	if want := fmt.Sprintf("ipam: store %s is locked by another process for 50ms", a.dir); te.Msg != want {
		t.Errorf("msg %q, want %q", te.Msg, want)
	}
	if d := time.Since(start); d < 50*time.Millisecond || d > 2*time.Second {
		t.Errorf("waited %v", d)
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	mustAllocate(t, a, "c1", "eth0")
}

func TestConfigChangeReconciles(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "10.22.0.0/24")
	mustAllocate(t, a, "c1", "eth0")
	// The network gains an IPv6 set: the same attachment keeps its IPv4 address and gets one more.
	b := newTestAllocator(t, dir, "10.22.0.0/24", "fd00::/64")
	if got := mustAllocate(t, b, "c1", "eth0"); !slices.Equal(got, []string{"10.22.0.2/24", "fd00::2/64"}) {
		t.Errorf("got %v", got)
	}
	// The IPv4 set moves: the old address is an extra and is freed.
	c := newTestAllocator(t, dir, "10.30.0.0/24", "fd00::/64")
	if got := mustAllocate(t, c, "c1", "eth0"); !slices.Equal(got, []string{"10.30.0.2/24", "fd00::2/64"}) {
		t.Errorf("got %v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "net1", "10.22.0.2")); !os.IsNotExist(err) {
		t.Errorf("old address kept: %v", err)
	}
}

func TestBigIPv6Range(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "fd00::/48,fd00::ffff:ffff:ffff:fffe,fd00:0:0:1::1")
	var got []string
	for i := range 4 {
		got = append(got, mustAllocate(t, a, fmt.Sprint("c", i), "eth0")...)
	}
	want := []string{"fd00::ffff:ffff:ffff:fffe/48", "fd00::ffff:ffff:ffff:ffff/48", "fd00:0:0:1::/48", "fd00:0:0:1::1/48"}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if _, err := a.Allocate("c9", "eth0"); !errors.Is(err, ErrNoFreeAddress) {
		t.Errorf("want exhaustion, got %v", err)
	}
}

func TestIndexNameUnambiguous(t *testing.T) {
	x := indexName(Attachment{"a_b", "c"})
	y := indexName(Attachment{"a", "b_c"})
	if x == y {
		t.Errorf("collision %q", x)
	}
	long := indexName(Attachment{strings.Repeat("é", 300), "eth0"})
	if len(long) > 255 || strings.ContainsAny(long, "/") {
		t.Errorf("bad name %q", long)
	}
	if n := indexName(Attachment{"../x", "eth0"}); strings.HasPrefix(n, ".") || strings.Contains(n, "/") {
		t.Errorf("bad name %q", n)
	}
	a := newTestAllocator(t, t.TempDir(), "10.22.0.0/24")
	if got := mustAllocate(t, a, "../../etc/x y", "eth/0"); got[0] != "10.22.0.2/24" {
		t.Fatal(got)
	}
	if ips, _ := a.Get("../../etc/x y", "eth/0"); len(ips) != 1 {
		t.Errorf("get = %v", ips)
	}
}

func TestNewRejectsBadNetworkName(t *testing.T) {
	c := &Config{DataDir: t.TempDir(), Ranges: []RangeSet{{{Subnet: mustNet(t, "10.0.0.0/24")}}}}
	for _, n := range []string{"", ".", "..", "a/b"} {
		if _, err := New(c, n); err == nil {
			t.Errorf("network %q accepted", n)
		}
	}
}
