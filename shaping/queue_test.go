package shaping

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/testnet"
)

// A burst longer than 32-bit ticks can hold at the rate (here 4295 s of
// 1 Mbit/s, the largest plugin-config burst): ADD, CHECK and repair agree.
func TestLongBurstNoDrift(t *testing.T) {
	_, _, s := kernelSetup(t)
	p := derive(1_000_000, 4294967295, true, 10*time.Millisecond, 1500, SourceConfig)
	d := desired(p, p)
	if _, err := s.Apply(d); err != nil {
		t.Fatal(err)
	}
	requireNoDiff(t, s, d, "Apply of a 4295 s burst")
	if changes, err := s.Apply(d); err != nil || len(changes) != 0 {
		t.Errorf("second Apply changed %q (%v)", changes, err)
	}
}

func requireNoDiff(t *testing.T, s *Shaper, d Desired, step string) {
	t.Helper()
	if diff, err := s.Diff(d); err != nil || len(diff) != 0 {
		t.Fatalf("Diff after %s: %q %v", step, diff, err)
	}
}

// openShaper is a second Shaper on the node, as a new plugin process or a
// restarted agent has: it knows nothing of earlier fq_codel probes.
func openShaper(t *testing.T, n *testnet.Node) *Shaper {
	t.Helper()
	s, err := OpenNetns(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

var leafLine = regexp.MustCompile(`qdisc (\S+) (\S+) parent 1:1 .*\n Sent (\d+) bytes`)

// leafOf returns the kind, handle and sent bytes of the queue under the shaper.
func leafOf(t *testing.T, n *testnet.Node) (string, string, uint64) {
	t.Helper()
	out := n.Exec(t, "tc", "-s", "qdisc", "show", "dev", "qvtest0")
	m := leafLine.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no leaf under 1:1:\n%s", out)
	}
	sent, _ := strconv.ParseUint(m[3], 10, 64)
	return m[1], m[2], sent
}

// Once a leaf sits under the shaper, reshaping changes it in place: same
// handle, counters kept (a new graft would start from zero and drop the
// queue), also from a new process.
func TestLeafChangedInPlace(t *testing.T) {
	for _, c := range []struct {
		name string
		// first sets up a leaf (a smaller burst grafts one under TBF; HTB
		// always has one), then reshape changes the rate.
		first, setup, reshape *Params
	}{
		{"tbf",
			derive(200_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation),
			derive(200_000_000, 800_000, true, 10*time.Millisecond, 1500, SourceAnnotation),
			derive(300_000_000, 800_000, true, 10*time.Millisecond, 1500, SourceAnnotation)},
		{"htb",
			derive(100_000_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation),
			derive(100_000_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation),
			derive(200_000_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)},
	} {
		t.Run(c.name, func(t *testing.T) {
			n, _, s := kernelSetup(t)
			if _, err := s.Apply(desired(c.first, nil)); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Apply(desired(c.setup, nil)); err != nil {
				t.Fatal(err)
			}
			n.Exec(t, "ping", "-c", "3", "-i", "0.2", "-W", "1", "10.66.0.2")
			kind, handle, sent := leafOf(t, n)
			if sent == 0 {
				t.Fatalf("no traffic through the leaf %s %s", kind, handle)
			}
			for i, p := range []*Params{c.reshape, c.setup} {
				s2 := openShaper(t, n)
				changes, err := s2.Apply(desired(p, nil))
				if err != nil || len(changes) != 1 {
					t.Fatalf("reshape %d from a new process: %q %v", i, changes, err)
				}
				k2, h2, sent2 := leafOf(t, n)
				if k2 != kind || h2 != handle || sent2 < sent {
					t.Fatalf("reshape %d replaced the leaf: was %s %s sent %d, now %s %s sent %d", i, kind, handle, sent, k2, h2, sent2)
				}
				requireNoDiff(t, s2, desired(p, nil), "reshape")
			}
			if strings.Contains(n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"), "qdisc bfifo") && s.HasFqCodel() {
				t.Error("bfifo leaf on a kernel with fq_codel")
			}
		})
	}
}
