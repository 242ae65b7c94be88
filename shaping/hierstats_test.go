package shaping

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/testnet"
)

// tcClassCounters reads one class's counters from tc -s's text.
func tcClassCounters(t *testing.T, n *testnet.Node, dev string, minor uint16) HierClassStats {
	t.Helper()
	out := n.Exec(t, "tc", "-s", "class", "show", "dev", dev, "classid", fmt.Sprintf("1:%x", minor))
	num := func(field string) uint64 {
		f := strings.Fields(strings.NewReplacer("(", " ", ")", " ", ",", " ").Replace(out))
		for i := 0; i+1 < len(f); i++ {
			if f[i] == field {
				v, err := strconv.ParseUint(strings.TrimRight(f[i+1], "bp"), 10, 64)
				if err != nil {
					t.Fatalf("%s in %q: %v", field, out, err)
				}
				return v
			}
		}
		t.Fatalf("no %s in %q", field, out)
		return 0
	}
	// "Sent <bytes> bytes <pkts> pkt (dropped <d>, overlimits <o> ...)"
	var s HierClassStats
	s.Bytes = num("Sent")
	s.Packets = uint32(num("bytes"))
	s.Drops, s.Overlimits = uint32(num("dropped")), uint32(num("overlimits"))
	s.Lends, s.Borrows = uint32(num("lended:")), uint32(num("borrowed:"))
	return s
}

// ReadHierarchy's counters are the kernel's, as tc(8) shows them: a pod
// that sends above its request borrows, over its limit the class
// throttles and its queue drops; a pod below its request borrows nothing.
func TestHierarchyClassStats(t *testing.T) {
	h := newHierNode(t, 2)
	const capBits = 20_000_000
	h.ensure(t, capBits)
	a, b := h.pods[0], h.pods[1]
	// a: 2 Mbit/s guaranteed, at most 4; b: 10 guaranteed.
	h.join(t, a, 0x20, HierLeaf{RateBytes: 2_000_000 / 8, CeilBytes: 4_000_000 / 8, Prio: 1,
		BurstBytes: 16 << 10, CburstBytes: 16 << 10, QueueBytes: 64 << 10}, capBits)
	h.join(t, b, 0x21, leafFor(10_000_000, capBits, 0), capBits)

	// 12 Mbit/s of UDP for 3 s out of a, most of which waits or drops in
	// its class. iperf3 paces UDP by the clock, not by replies as ping
	// does; a socket's send buffer still holds what waits in the class
	// (the skb keeps its socket across the veth), so one socket would
	// only fill the queue: four together overflow it.
	if _, err := exec.LookPath("iperf3"); err != nil {
		if os.Getenv(testnet.RequireRootEnv) != "" {
			t.Fatal("iperf3 not installed")
		}
		t.Skip("iperf3 not installed")
	}
	const port = 5321
	srv := exec.Command("ip", "netns", "exec", h.net.Name, "iperf3", "-s", "-p", fmt.Sprint(port), "--bind", "0.0.0.0")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })
	waitListening(t, h.net, port)
	a.ns.Exec(t, "iperf3", "-c", "10.70.0.2", "-p", fmt.Sprint(port), "-u", "-b", "3M", "-P", "4", "-l", "1400", "-t", "3")
	b.ns.Exec(t, "ping", "-q", "-c", "5", "-i", "0.05", "-s", "1400", "-w", "10", "10.70.0.2")

	// Bracketed by two tc reads: a stray packet (neighbour discovery)
	// between the reads must not fail the comparison.
	for _, c := range []struct {
		minor uint16
		pod   string
	}{{0x20, "a"}, {0x21, "b"}} {
		before := tcClassCounters(t, h.node, HierarchyEgressIFB, c.minor)
		st, err := h.s.ReadHierarchy(OutOfPods)
		if err != nil {
			t.Fatal(err)
		}
		after := tcClassCounters(t, h.node, HierarchyEgressIFB, c.minor)
		got := st.Classes[c.minor].Stats
		t.Logf("%s: read %+v, tc %+v", c.pod, got, before)
		for _, f := range []struct {
			name      string
			lo, v, hi uint64
		}{
			{"bytes", before.Bytes, got.Bytes, after.Bytes},
			{"packets", uint64(before.Packets), uint64(got.Packets), uint64(after.Packets)},
			{"drops", uint64(before.Drops), uint64(got.Drops), uint64(after.Drops)},
			{"overlimits", uint64(before.Overlimits), uint64(got.Overlimits), uint64(after.Overlimits)},
			{"lends", uint64(before.Lends), uint64(got.Lends), uint64(after.Lends)},
			{"borrows", uint64(before.Borrows), uint64(got.Borrows), uint64(after.Borrows)},
		} {
			if f.v < f.lo || f.v > f.hi {
				t.Errorf("%s: %s = %d, tc shows %d then %d", c.pod, f.name, f.v, f.lo, f.hi)
			}
		}
		// Both leaves cut (64 KiB budgets): the drops are their TBF's.
		q := h.node.Exec(t, "tc", "-s", "qdisc", "show", "dev", HierarchyEgressIFB, "parent", fmt.Sprintf("1:%x", c.minor))
		if !st.Classes[c.minor].Cut || !strings.Contains(q, fmt.Sprintf("qdisc tbf %x: ", hierCutMajor+uint32(c.minor))) ||
			!strings.Contains(q, fmt.Sprintf("(dropped %d,", got.Drops)) {
			t.Errorf("%s: cut %v, drops %d, its leaf: %s", c.pod, st.Classes[c.minor].Cut, got.Drops, q)
		}
		switch c.pod {
		case "a":
			if got.Drops == 0 || got.Overlimits == 0 || got.Borrows == 0 || got.Lends == 0 {
				t.Errorf("a sent 12 Mbit/s with 2 guaranteed and a 4 Mbit/s limit: %+v", got)
			}
			// 4 Mbit/s for about 3 s (and the queue), of 4.5 MB offered.
			if got.Bytes < 1_000_000 || got.Bytes > 2_500_000 {
				t.Errorf("a's class sent %d bytes, want about 1.5 MB", got.Bytes)
			}
		case "b":
			if got.Borrows != 0 || got.Lends < 5 || got.Drops != 0 {
				t.Errorf("b sent 5 pings under its 10 Mbit/s request: %+v", got)
			}
		}
	}
}
