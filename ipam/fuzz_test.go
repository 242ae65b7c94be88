package ipam

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// FuzzIPAMConfig decodes an "ipam" object as netconf does and validates it.
// Decoding errors are netconf's to map (FuzzParseNetConf covers them);
// Validate must refuse with a CNI error 7 naming an ipam field, or leave a
// canonical config that validates again unchanged, survives a JSON round
// trip, and whose walk offers exactly the addresses allocatable counts.
func FuzzIPAMConfig(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		var c Config
		if json.Unmarshal(data, &c) != nil {
			return
		}
		if err := c.Validate(); err != nil {
			var e *types.Error
			if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.HasPrefix(e.Msg, "ipam.") {
				t.Fatalf("want CNI error 7 naming an ipam field, got %T %v", err, err)
			}
			return
		}
		canon, err := json.Marshal(&c)
		if err != nil {
			t.Fatalf("marshal validated config: %v", err)
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("second Validate: %v", err)
		}
		if again, _ := json.Marshal(&c); !bytes.Equal(again, canon) {
			t.Fatalf("Validate not idempotent:\n%s\n%s", canon, again)
		}
		var c2 Config
		if err := json.Unmarshal(canon, &c2); err != nil {
			t.Fatalf("canonical config does not decode: %v\n%s", err, canon)
		}
		if err := c2.Validate(); err != nil {
			t.Fatalf("canonical config rejected: %v\n%s", err, canon)
		}
		if again, _ := json.Marshal(&c2); !bytes.Equal(again, canon) {
			t.Fatalf("round trip changed the config:\n%s\n%s", canon, again)
		}
		if !filepath.IsAbs(c.DataDir) {
			t.Fatalf("dataDir %q", c.DataDir)
		}

		var sets []rangeSet
		var gateways []netip.Addr
		var all []span
		for i, set := range c.Ranges {
			spans := make([]span, len(set))
			for j := range set {
				s, err := c.canonicalize(i, j)
				if err != nil {
					t.Fatalf("canonicalize(%d,%d) after Validate: %v", i, j, err)
				}
				checkSpan(t, s, set[j])
				if j > 0 && s.prefix.Addr().Is4() != spans[0].prefix.Addr().Is4() {
					t.Fatalf("set %d mixes families", i)
				}
				for _, o := range all {
					if o.overlaps(s) {
						t.Fatalf("%s overlaps %s", s.interval(), o.interval())
					}
				}
				all = append(all, s)
				spans[j] = s
				gateways = append(gateways, s.gateway)
			}
			sets = append(sets, newRangeSet(i, spans))
		}
		for i := range sets {
			checkWalk(t, &sets[i], gateways)
		}
	})
}

// checkSpan: the canonical range is in the address family's byte form and
// every address of it lies in the subnet, start <= end.
func checkSpan(t *testing.T, s span, r Range) {
	t.Helper()
	p := s.prefix
	if p.Masked() != p || !p.Contains(s.start) || !p.Contains(s.end) || !p.Contains(s.gateway) || s.start.Compare(s.end) > 0 {
		t.Fatalf("bad span %s %s gw %s", p, s.interval(), s.gateway)
	}
	n := p.Addr().BitLen() / 8
	if len(r.Subnet.IP) != n || len(r.Subnet.Mask) != n || len(r.RangeStart) != n || len(r.RangeEnd) != n || len(r.Gateway) != n {
		t.Fatalf("range %+v not in %d-byte form", r, n)
	}
}

// checkWalk: a walk offers each allocatable address once, none of them
// skipped or outside the set; from any hint it offers the same addresses
// and ends with the hint. Only the first addresses of large sets are taken.
func checkWalk(t *testing.T, rs *rangeSet, gateways []netip.Addr) {
	t.Helper()
	const most = 300
	total := rs.allocatable(gateways)
	collect := func(hint netip.Addr) []netip.Addr {
		var got []netip.Addr
		rs.walk(hint, gateways, func(a netip.Addr) bool {
			got = append(got, a)
			return len(got) == most
		})
		return got
	}
	got := collect(netip.Addr{})
	if uint64(len(got)) != min(total, most) {
		t.Fatalf("set %d (%s): walk offered %d addresses, allocatable says %d", rs.index, rs.label, len(got), total)
	}
	seen := map[netip.Addr]bool{}
	for _, a := range got {
		i := rs.spanOf(a)
		if i < 0 || seen[a] || skip(&rs.spans[i], a, gateways) || a.Zone() != "" {
			t.Fatalf("set %d (%s): walk offered %s (span %d, repeated %v)", rs.index, rs.label, a, i, seen[a])
		}
		seen[a] = true
	}
	if total >= most || len(got) == 0 {
		return
	}
	for _, hint := range []netip.Addr{got[len(got)/2], got[len(got)-1], rs.spans[0].end} {
		from := collect(hint)
		if len(from) != len(got) {
			t.Fatalf("set %d: walk from %s offered %d addresses, want %d", rs.index, hint, len(from), len(got))
		}
		for _, a := range from {
			if !seen[a] {
				t.Fatalf("set %d: walk from %s offered %s", rs.index, hint, a)
			}
		}
		if seen[hint] && from[len(from)-1] != hint {
			t.Fatalf("set %d: walk from %s ends with %s", rs.index, hint, from[len(from)-1])
		}
	}
}

// The store FuzzIPAMStore works on: a v4 set with 5 allocatable addresses
// (.2-.6) and a v6 set with 6 (::2-::7).
const fuzzStoreConfig = `{"ranges":[[{"subnet":"10.9.0.0/29"}],[{"subnet":"fd00:9::/125"}]]}`

var (
	fuzzForeign = mustAddrs("10.9.0.2", "fd00:9::2")
	fuzzHolder  = Attachment{"c1", "eth0"}
	fuzzNew     = Attachment{"c2", "eth0"}
)

// FuzzIPAMStore puts fuzzed bytes where the allocator reads files from its
// data dir: the owner record of an address file (10.9.0.2 and fd00:9::2),
// the attachment index of c1/eth0, the round-robin hint of both sets, and
// one more file under a fuzzed name. Then it runs a pod's life and GC
// against that store. Whatever the files hold, an address handed out is
// inside its set, visible to the scans that Get, Release and GC do, owned
// by the pod, and released again; a file whose owner cannot be read is
// never handed out or freed.
func FuzzIPAMStore(f *testing.F) {
	f.Fuzz(func(t *testing.T, owner, index, hint []byte, name string) {
		var cfg Config
		if err := json.Unmarshal([]byte(fuzzStoreConfig), &cfg); err != nil {
			t.Fatal(err)
		}
		cfg.DataDir = t.TempDir()
		a, err := New(&cfg, "net")
		if err != nil {
			t.Fatal(err)
		}
		a.LockTimeout = 0
		write := func(path string, data []byte) {
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		for _, ip := range fuzzForeign {
			write(a.ipPath(ip), owner)
		}
		write(a.indexPath(fuzzHolder), index)
		write(filepath.Join(a.dir, hintPrefix+"0"), hint)
		write(filepath.Join(a.dir, hintPrefix+"1"), hint)
		foreign := slices.Clone(fuzzForeign)
		if name != "" && name != "." && name != ".." && len(name) < 200 && !strings.ContainsAny(name, "/\x00") {
			// Fails for the attachments directory, which is fine.
			if os.WriteFile(filepath.Join(a.dir, name), owner, 0o600) == nil {
				if ip, ok := parseIPName(name); ok && a.setOf(ip) >= 0 {
					foreign = append(foreign, ip)
				}
			}
		}
		_, foreignKnown := parseOwner(owner[:min(len(owner), maxFileRead)])

		held, err := a.Get(fuzzHolder.ContainerID, fuzzHolder.IfName)
		if err != nil {
			t.Fatalf("Get over fuzzed store: %v", err)
		}
		for _, ip := range held {
			addr, _ := addrOf(ip)
			if !a.ownedBy(addr, fuzzHolder) {
				t.Fatalf("Get returned %s, which c1/eth0 does not own", ip)
			}
		}

		// Each set has room whatever two files claim.
		cfgs, err := a.Allocate(fuzzNew.ContainerID, fuzzNew.IfName)
		if err != nil {
			t.Fatalf("Allocate over fuzzed store: %v", err)
		}
		if len(cfgs) != len(a.sets) {
			t.Fatalf("Allocate gave %d addresses for %d sets", len(cfgs), len(a.sets))
		}
		entries, err := a.scan()
		if err != nil {
			t.Fatal(err)
		}
		var got []netip.Addr
		for i, c := range cfgs {
			ip, ok := addrOf(c.Address.IP)
			if !ok || a.setOf(ip) != i {
				t.Fatalf("address %v is not in set %d", c.Address, i)
			}
			rs := &a.sets[i]
			if skip(&rs.spans[rs.spanOf(ip)], ip, a.gateways) {
				t.Fatalf("handed out network, broadcast or gateway %s", ip)
			}
			if slices.Contains(foreign, ip) && !foreignKnown {
				t.Fatalf("handed out %s, whose file has an unreadable owner", ip)
			}
			if !slices.ContainsFunc(entries, func(e ipEntry) bool { return e.ip == ip && e.state == ipOwned && e.owner == fuzzNew }) {
				t.Fatalf("handed out %s but no scan sees it owned by %v", ip, fuzzNew)
			}
			got = append(got, ip)
		}
		again, err := a.Allocate(fuzzNew.ContainerID, fuzzNew.IfName)
		if err != nil || !sameConfigs(again, cfgs) {
			t.Fatalf("second Allocate: %v, %v; first gave %v", addrsOf(again), err, addrsOf(cfgs))
		}
		if ips, err := a.Get(fuzzNew.ContainerID, fuzzNew.IfName); err != nil || len(ips) != len(got) {
			t.Fatalf("Get after Allocate: %v, %v; allocated %v", ips, err, got)
		}
		if _, err := a.Usage(); err != nil {
			t.Fatalf("Usage: %v", err)
		}
		if err := a.Release(fuzzNew.ContainerID, fuzzNew.IfName); err != nil {
			t.Fatalf("Release: %v", err)
		}
		for _, ip := range got {
			if _, st := a.readOwner(ip); st != ipFree {
				t.Fatalf("%s still reserved after Release", ip)
			}
		}

		if _, err := a.GC(nil); err != nil {
			t.Fatalf("GC: %v", err)
		}
		entries, err = a.scan()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.state == ipOwned {
				t.Fatalf("GC with no valid attachment kept %s owned by %v", e.ip, e.owner)
			}
		}
		for _, ip := range foreign {
			_, st := a.readOwner(ip)
			if foreignKnown != (st == ipFree) {
				t.Fatalf("after GC %s is %v; owner readable %v", ip, st, foreignKnown)
			}
		}
		if idx, _ := os.ReadDir(filepath.Join(a.dir, indexDir)); len(idx) != 0 {
			t.Fatalf("GC left indexes %v", idx)
		}
	})
}

func sameConfigs(x, y []*current.IPConfig) bool { return slices.Equal(addrsOf(x), addrsOf(y)) }

func addrsOf(cfgs []*current.IPConfig) []string {
	out := make([]string, len(cfgs))
	for i, c := range cfgs {
		out[i] = c.Address.String() + " gw " + net.IP(c.Gateway).String()
	}
	return out
}
