package shaping

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/testnet"
)

// In chained mode the host veth is the main plugin's, and so may be the
// clsact qdisc and filters on it (Calico eBPF, Cilium). These tests put
// such a neighbour on the veth with tc and check qoscni works around it.

// foreignDst is what the neighbour's filter matches: a documentation
// address no test traffic uses, so it never takes our packets.
const foreignDst = "c0000263/ffffffff" // 192.0.2.99 as tc prints a u32 key

func addNeighbourFilter(t *testing.T, n *testnet.Node, dev string, prio int) {
	t.Helper()
	if _, err := n.Try("tc", "qdisc", "add", "dev", dev, "clsact"); err != nil {
		// Already there (ours or the neighbour's): that is the point.
		n.Exec(t, "tc", "qdisc", "show", "dev", dev, "clsact")
	}
	n.Exec(t, "tc", "filter", "add", "dev", dev, "ingress", "prio", fmt.Sprint(prio), "protocol", "all",
		"u32", "match", "ip", "dst", "192.0.2.99/32", "flowid", "1:5")
}

func requireNeighbour(t *testing.T, n *testnet.Node, dev string, prio int, step string) {
	t.Helper()
	f := n.Exec(t, "tc", "filter", "show", "dev", dev, "ingress")
	if !strings.Contains(f, fmt.Sprintf("pref %d u32", prio)) || !strings.Contains(f, foreignDst) {
		t.Fatalf("%s removed the neighbour's filter (prio %d) from %s:\n%s", step, prio, dev, f)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", dev); !strings.Contains(q, "clsact") {
		t.Fatalf("%s removed the clsact qdisc the neighbour's filter lives in:\n%s", step, q)
	}
}

// A neighbour's filter at priority 1, protocol all (where qoscni used to
// put its own) survives chained ADD, live reshape, drift repair, egress
// removal and DEL.
func TestNeighbourFilterSurvives(t *testing.T) {
	n, _, s := kernelSetup(t)
	addNeighbourFilter(t, n, "qvtest0", 1)
	p := func(bits uint64) *Params { return derive(bits, 0, false, 10*time.Millisecond, 1500, SourceAnnotation) }

	// Chained ADD calls Apply on the main plugin's veth.
	d := desired(p(10_000_000), p(20_000_000))
	if _, err := s.Apply(d); err != nil {
		t.Fatalf("ADD beside a neighbour's filter: %v", err)
	}
	requireNeighbour(t, n, "qvtest0", 1, "ADD")
	requireNoDiff(t, s, d, "ADD")
	f := n.Exec(t, "tc", "filter", "show", "dev", "qvtest0", "ingress")
	if !strings.Contains(f, "Redirect to device qitest0") || !strings.Contains(f, fmt.Sprintf("pref %d u32", redirectPrio)) {
		t.Fatalf("no redirect at priority %d after ADD:\n%s", redirectPrio, f)
	}
	t.Logf("ingress hook after ADD:\n%s", f)

	// Live reshape of both directions.
	d = desired(p(5_000_000), p(8_000_000))
	if _, err := s.Apply(d); err != nil {
		t.Fatal(err)
	}
	requireNeighbour(t, n, "qvtest0", 1, "reshape")
	requireNoDiff(t, s, d, "reshape")

	// Drift repair: the IFB's shaper and our redirect deleted by hand.
	n.Exec(t, "tc", "qdisc", "del", "dev", "qitest0", "root")
	if changes, err := s.Apply(d); err != nil || len(changes) != 1 {
		t.Fatalf("repair of the IFB's root: %q %v", changes, err)
	}
	requireNeighbour(t, n, "qvtest0", 1, "repair of the IFB's root")
	ours := ownFilterHandle(t, n, "qvtest0")
	n.Exec(t, "tc", "filter", "del", "dev", "qvtest0", "ingress", "prio", fmt.Sprint(redirectPrio), "protocol", "all", "handle", ours, "u32")
	if changes, err := s.Apply(d); err != nil || len(changes) != 1 {
		t.Fatalf("repair of the redirect: %q %v", changes, err)
	}
	requireNeighbour(t, n, "qvtest0", 1, "repair of the redirect")
	requireNoDiff(t, s, d, "repair")

	// Egress shaping removed: our filter and IFB go, the neighbour stays.
	d = desired(p(5_000_000), nil)
	if _, err := s.Apply(d); err != nil {
		t.Fatal(err)
	}
	requireNeighbour(t, n, "qvtest0", 1, "egress removal")
	if f := n.Exec(t, "tc", "filter", "show", "dev", "qvtest0", "ingress"); strings.Contains(f, "mirred") {
		t.Errorf("redirect left after egress removal:\n%s", f)
	}
	if _, err := n.Try("ip", "link", "show", "qitest0"); err == nil {
		t.Error("IFB left after egress removal")
	}
	requireNoDiff(t, s, d, "egress removal")
	if changes, err := s.Apply(d); err != nil || len(changes) != 0 {
		t.Errorf("second Apply after egress removal: %q %v", changes, err)
	}

	// DEL (chained: Remove) with both directions shaped.
	d = desired(p(5_000_000), p(8_000_000))
	if _, err := s.Apply(d); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	requireNeighbour(t, n, "qvtest0", 1, "DEL")
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); strings.Contains(q, "tbf") {
		t.Errorf("our shaper left after DEL:\n%s", q)
	}
	if f := n.Exec(t, "tc", "filter", "show", "dev", "qvtest0", "ingress"); strings.Contains(f, "mirred") {
		t.Errorf("redirect left after DEL:\n%s", f)
	}
	if _, err := n.Try("ip", "link", "show", "qitest0"); err == nil {
		t.Error("IFB left after DEL")
	}
}

// ownFilterHandle is the handle of the u32 key node qoscni put at its
// priority, as tc prints it ("fh 801::800").
func ownFilterHandle(t *testing.T, n *testnet.Node, dev string) string {
	t.Helper()
	f := n.Exec(t, "tc", "filter", "show", "dev", dev, "ingress")
	for _, l := range strings.Split(f, "\n") {
		if !strings.Contains(l, fmt.Sprintf("pref %d u32", redirectPrio)) || !strings.Contains(l, "::") {
			continue
		}
		fs := strings.Fields(l)
		for i, w := range fs {
			if w == "fh" && i+1 < len(fs) {
				return fs[i+1]
			}
		}
	}
	t.Fatalf("no key node at priority %d on %s:\n%s", redirectPrio, dev, f)
	return ""
}

// A clsact qdisc with nothing but our redirect goes with it; one holding a
// neighbour's filter on the egress hook stays.
func TestClsactKeptForEgressHookFilter(t *testing.T) {
	n, _, s := kernelSetup(t)
	eg := derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	if _, err := s.Apply(desired(nil, eg)); err != nil {
		t.Fatal(err)
	}
	n.Exec(t, "tc", "filter", "add", "dev", "qvtest0", "egress", "prio", "3", "protocol", "ip",
		"u32", "match", "ip", "dst", "192.0.2.99/32", "flowid", "1:5")
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if f := n.Exec(t, "tc", "filter", "show", "dev", "qvtest0", "egress"); !strings.Contains(f, foreignDst) {
		t.Fatalf("neighbour's egress-hook filter removed:\n%s", f)
	}
	n.Exec(t, "tc", "filter", "del", "dev", "qvtest0", "egress")
	if _, err := s.Apply(desired(nil, eg)); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); strings.Contains(q, "clsact") {
		t.Errorf("clsact with nothing attached left after Remove:\n%s", q)
	}
}

// A neighbour at qoscni's own priority: ADD refuses with an error naming
// it and changes nothing.
func TestOwnPriorityTakenByNeighbour(t *testing.T) {
	n, _, s := kernelSetup(t)
	addNeighbourFilter(t, n, "qvtest0", redirectPrio)
	eg := derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	_, err := s.Apply(desired(nil, eg))
	var cerr *types.Error
	if err == nil || !errors.As(err, &cerr) || cerr.Code != types.ErrInvalidNetworkConfig {
		t.Fatalf("Apply with our priority taken: %v, want CNI error %d", err, types.ErrInvalidNetworkConfig)
	}
	t.Logf("refused: %s", cerr.Msg)
	// The neighbour's key node, not its classifier's entry (handle 0).
	for _, w := range []string{"qvtest0", fmt.Sprint(redirectPrio), "u32", "handle 0x800"} {
		if !strings.Contains(cerr.Msg, w) {
			t.Errorf("error %q does not name %q", cerr.Msg, w)
		}
	}
	requireNeighbour(t, n, "qvtest0", redirectPrio, "refused ADD")
	if f := n.Exec(t, "tc", "filter", "show", "dev", "qvtest0", "ingress"); strings.Contains(f, "mirred") {
		t.Errorf("refused ADD added a redirect:\n%s", f)
	}
	if _, err := n.Try("ip", "link", "show", "qitest0"); err == nil {
		t.Error("refused ADD left an IFB")
	}
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	requireNeighbour(t, n, "qvtest0", redirectPrio, "Remove")
}

// A root qdisc qoscni did not make: ADD (and the agent's reshape and
// repair, which call the same Apply) refuse with a CNI error naming it,
// and nothing changes; without ingress shaping it is not in the way.
func TestForeignRootRefused(t *testing.T) {
	for _, c := range []struct {
		args   []string
		kind   string
		handle string
	}{
		{[]string{"handle", "5:", "htb"}, "htb", "5:"},
		{[]string{"handle", "7:", "tbf", "rate", "1mbit", "burst", "10kb", "latency", "50ms"}, "tbf", "7:"},
	} {
		t.Run(c.kind, func(t *testing.T) {
			n, _, s := kernelSetup(t)
			n.Exec(t, "tc", append([]string{"qdisc", "add", "dev", "qvtest0", "root"}, c.args...)...)
			before := n.Qdiscs(t, "qvtest0")
			in := derive(10_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
			eg := derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
			_, err := s.Apply(desired(in, eg))
			var cerr *types.Error
			if err == nil || !errors.As(err, &cerr) || cerr.Code != types.ErrInvalidNetworkConfig {
				t.Fatalf("Apply over a foreign root: %v, want CNI error %d", err, types.ErrInvalidNetworkConfig)
			}
			for _, w := range []string{"qvtest0", c.kind, c.handle} {
				if !strings.Contains(cerr.Msg, w) {
					t.Errorf("error %q does not name %q", cerr.Msg, w)
				}
			}
			if after := n.Qdiscs(t, "qvtest0"); after != before {
				t.Errorf("refused Apply changed the veth's qdiscs:\nbefore %s\nafter %s", before, after)
			}
			if _, err := n.Try("ip", "link", "show", "qitest0"); err == nil {
				t.Error("refused Apply left an IFB")
			}
			if diff, err := s.Diff(desired(in, eg)); err != nil || len(diff) == 0 || !strings.Contains(strings.Join(diff, " "), c.handle) {
				t.Errorf("CHECK over a foreign root: %q %v", diff, err)
			}
			// Egress only: the root is not ours to write, and not in the way.
			if _, err := s.Apply(desired(nil, eg)); err != nil {
				t.Fatalf("egress-only Apply beside a foreign root: %v", err)
			}
			if err := s.Remove("qvtest0", "qitest0"); err != nil {
				t.Fatal(err)
			}
			if after := n.Qdiscs(t, "qvtest0"); after != before {
				t.Errorf("Remove changed the foreign root:\nbefore %s\nafter %s", before, after)
			}
		})
	}
}

// A redirect from before the marker (priority 1, no cookie, to this
// attachment's IFB) is replaced by ours without a gap, and goes on DEL;
// a neighbour's filter in the same priority stays.
func TestLegacyRedirectMigrated(t *testing.T) {
	n, _, s := kernelSetup(t)
	eg := derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	n.Exec(t, "ip", "link", "add", "qitest0", "type", "ifb")
	n.Exec(t, "ip", "link", "set", "qitest0", "up")
	addNeighbourFilter(t, n, "qvtest0", legacyRedirectPrio)
	n.Exec(t, "tc", "filter", "add", "dev", "qvtest0", "ingress", "prio", "1", "protocol", "all", "u32",
		"match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "qitest0")
	if _, err := s.Apply(desired(nil, eg)); err != nil {
		t.Fatal(err)
	}
	f := n.Exec(t, "tc", "filter", "show", "dev", "qvtest0", "ingress")
	if strings.Count(f, "Redirect to device qitest0") != 1 || !strings.Contains(f, "cookie") {
		t.Fatalf("want exactly our marked redirect:\n%s", f)
	}
	requireNeighbour(t, n, "qvtest0", 1, "migration")
	requireNoDiff(t, s, desired(nil, eg), "migration")

	// An unmarked one alone at priority 1 goes with its classifier on DEL.
	n.Exec(t, "tc", "filter", "del", "dev", "qvtest0", "ingress", "prio", "1")
	n.Exec(t, "tc", "filter", "add", "dev", "qvtest0", "ingress", "prio", "1", "protocol", "all", "u32",
		"match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "qitest0")
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); strings.Contains(q, "clsact") {
		t.Errorf("clsact left with nothing on it:\n%s", q)
	}
}

// An ADD killed between adding the clsact and the redirect leaves an empty
// clsact, which DEL takes; the rollback of a refused ADD (no IFB made)
// keeps an empty clsact that was there before.
func TestRemoveEmptyClsact(t *testing.T) {
	n, _, s := kernelSetup(t)
	eg := derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	if _, err := s.Apply(desired(nil, eg)); err != nil {
		t.Fatal(err)
	}
	n.Exec(t, "tc", "filter", "del", "dev", "qvtest0", "ingress")
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); strings.Contains(q, "clsact") {
		t.Errorf("empty clsact of a half-done ADD left after DEL:\n%s", q)
	}

	n.Exec(t, "tc", "qdisc", "add", "dev", "qvtest0", "clsact")
	n.Exec(t, "tc", "qdisc", "add", "dev", "qvtest0", "root", "handle", "5:", "htb")
	in := derive(10_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	if _, err := s.Apply(desired(in, eg)); err == nil {
		t.Fatal("Apply over a foreign root succeeded")
	}
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); !strings.Contains(q, "clsact") || !strings.Contains(q, "htb 5:") {
		t.Errorf("rollback of a refused ADD changed the veth:\n%s", q)
	}
}
