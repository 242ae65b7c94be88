package reltest

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/testnet"
)

// Snapshot is everything a pod can leave in the node: links, addresses,
// routes, qdiscs, the qoscni nftables table (stateless listing, so packet
// counters do not count), and the entries of the IPAM and state
// directories with their modes. The round-robin hints move between rounds
// by design, so only their presence counts.
type Snapshot map[string][]string

// TakeSnapshot records the node's Snapshot now.
func TakeSnapshot(t testing.TB, n *testnet.Node) Snapshot {
	t.Helper()
	s := Snapshot{}
	lines := func(out string) []string {
		var l []string
		for _, x := range strings.Split(out, "\n") {
			// Carrier and DAD state follow the bridge's ports asynchronously.
			x = strings.ReplaceAll(strings.ReplaceAll(x, " linkdown", ""), " tentative", "")
			if x = strings.TrimSpace(x); x != "" {
				l = append(l, x)
			}
		}
		sort.Strings(l)
		return l
	}
	var links []string
	for _, l := range lines(n.Exec(t, "ip", "-o", "link", "show")) {
		// "3: qsbr0: <...> mtu ... state UP ..." minus the index and the
		// operational state, which follows the bridge's ports.
		f := strings.Fields(l)
		if len(f) > 1 {
			links = append(links, strings.TrimSuffix(f[1], ":"))
		}
	}
	sort.Strings(links)
	s["links"] = links
	s["addrs"] = lines(n.Exec(t, "ip", "-o", "addr", "show"))
	s["routes4"] = lines(n.Exec(t, "ip", "-4", "route", "show", "table", "all"))
	// The kernel adds local and anycast routes for a link's fe80:: address
	// when its DAD is done, asynchronously (a pod veth's, and the bridge's
	// once it first has a port): the kernel's, not the plugin's state.
	for _, r := range lines(n.Exec(t, "ip", "-6", "route", "show", "table", "all")) {
		if !(strings.Contains(r, "fe80:") && strings.Contains(r, "table local")) {
			s["routes6"] = append(s["routes6"], r)
		}
	}
	s["qdiscs"] = lines(n.Exec(t, "tc", "qdisc", "show"))
	if out, err := n.Try("nft", "-s", "list", "table", "inet", "qoscni"); err == nil {
		s["nft"] = lines(out)
	}
	for _, d := range []struct{ key, dir string }{{"ipam", n.IPAMDir}, {"state", n.StateDir}} {
		var entries []string
		err := filepath.WalkDir(d.dir, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			info, err := e.Info()
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(d.dir, p)
			entries = append(entries, fmt.Sprintf("%s %v", rel, info.Mode()))
			return nil
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("walk %s: %v", d.dir, err)
		}
		sort.Strings(entries)
		s[d.key] = entries
	}
	return s
}

// Diff lists what b has that a lacks ("key + line") and the reverse
// ("key - line"), sorted.
func (a Snapshot) Diff(b Snapshot) []string {
	var out []string
	keys := map[string]bool{}
	for k := range a {
		keys[k] = true
	}
	for k := range b {
		keys[k] = true
	}
	var sorted []string
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	for _, k := range sorted {
		in := func(l []string) map[string]int {
			m := map[string]int{}
			for _, x := range l {
				m[x]++
			}
			return m
		}
		ma, mb := in(a[k]), in(b[k])
		for x, c := range mb {
			if ma[x] < c {
				out = append(out, k+" + "+x)
			}
		}
		for x, c := range ma {
			if mb[x] < c {
				out = append(out, k+" - "+x)
			}
		}
	}
	sort.Strings(out)
	return out
}
