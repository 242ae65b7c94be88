package reconcile_test

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

func request(r *state.Record) uint64 {
	if r.Shaping == nil || r.Shaping.Guarantee == nil || r.Shaping.Guarantee.Ingress == nil {
		return 0
	}
	return r.Shaping.Guarantee.Ingress.RequestBits
}

func requests(bits string) map[string]string {
	return map[string]string{shaping.AnnotationIngressRequest: bits, shaping.AnnotationEgressRequest: bits}
}

// A pod's request follows its annotation live, in the node hierarchy: a
// larger request that still fits is applied in place, one that does not
// fit keeps the current one and says why (event), and removing the request
// makes the pod best effort under the same class minor.
func TestGuaranteeReshapedLive(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{configure: func(e *env, c *reconcile.Config) { c.StateRegistry = e.node.Registry }})
	e.conf["nodeCapacity"] = map[string]any{"ingress": "100M", "egress": "100M"}
	_, g1 := e.addPod("g1", requests("30M"))
	e.addPod("g2", requests("50M"))
	minor := g1.Shaping.Guarantee.Minor
	classes := func() string {
		return e.node.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB)
	}

	e.annotate("g1", requests("40M"))
	e.waitRecord(g1.ContainerID, "request 40M applied", func(r *state.Record) bool { return request(r) == 40_000_000 })
	if c := classes(); !strings.Contains(c, "rate 40Mbit ceil 100Mbit") || !strings.Contains(c, "class htb 1:2 parent 1:1 rate 10001Kbit") {
		t.Errorf("after 40M:\n%s", c)
	}

	// 60M next to g2's 50M does not fit in 100M: kept at 40M, with an event.
	e.annotate("g1", requests("60M"))
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) && len(e.events("g1")) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	evs := e.events("g1")
	if len(evs) != 1 || !strings.Contains(evs[0].Message, "node capacity 100Mbit/s") || !strings.Contains(evs[0].Message, "50Mbit/s already reserved") {
		t.Fatalf("events: %+v", evs)
	}
	if r := e.record(g1.ContainerID); request(r) != 40_000_000 {
		t.Errorf("refused request changed the record: %+v", r.Shaping.Guarantee.Ingress)
	}
	if c := classes(); !strings.Contains(c, "rate 40Mbit ceil 100Mbit") || strings.Contains(c, "rate 60Mbit") {
		t.Errorf("refused request changed the kernel:\n%s", c)
	}

	// No request: best effort, same minor, its 40M go back to best effort.
	e.annotate("g1", map[string]string{})
	e.waitRecord(g1.ContainerID, "best effort", func(r *state.Record) bool {
		return r.Shaping != nil && r.Shaping.Guarantee != nil && request(r) == 0 && r.Shaping.Guarantee.Minor == minor
	})
	c := classes()
	if !strings.Contains(c, "class htb 1:2 parent 1:1 rate 50001Kbit") || !strings.Contains(c, "parent 1:2 leaf") {
		t.Errorf("after the request went:\n%s", c)
	}
	if d := e.diff(e.record(g1.ContainerID)); len(d) != 0 {
		t.Errorf("CHECK differs: %q", d)
	}
}

// The agent brings the node hierarchy back from the records: a deleted
// IFB (with the classes and entries on it), a class changed by hand; and
// it removes a class no record claims, once it has gone unclaimed for the
// grace period.
func TestHierarchyDriftRepairedAndCollected(t *testing.T) {
	t.Parallel()
	var hr *shaping.HierarchyRepairer
	now := time.Now()
	e := newEnv(t, envOpts{noAPI: true, configure: func(e *env, c *reconcile.Config) {
		c.StateRegistry = e.node.Registry
		hr = shaping.NewHierarchyRepairer(c.NetnsFd, paths.HierarchyLockOf(e.node.Registry), nil)
		hr.Now = func() time.Time { return now }
		c.Repairers = []reconcile.KernelRepairer{hr}
	}})
	e.conf["nodeCapacity"] = map[string]any{"ingress": "100M", "egress": "100M"}
	_, g1 := e.addPod("g1", requests("30M"))
	_, g2 := e.addPod("g2", nil)
	m1 := g1.Shaping.Guarantee.Minor
	if res := e.pass(); res.Repaired != 0 {
		t.Fatalf("a pass over a whole hierarchy repaired %d", res.Repaired)
	}

	e.node.Exec(t, "ip", "link", "del", shaping.HierarchyEgressIFB)
	e.node.Exec(t, "tc", "class", "change", "dev", shaping.HierarchyIngressIFB, "parent", "1:1", "classid", fmt.Sprintf("1:%x", m1),
		"htb", "rate", "1mbit", "ceil", "100mbit")
	if res := e.pass(); res.Repaired < 3 {
		t.Errorf("repairs after the drift: %+v", res)
	}
	for _, rec := range []*state.Record{g1, g2} {
		if d := e.diff(rec); len(d) != 0 {
			t.Errorf("%s after repair: %q", rec.Pod.Name, d)
		}
	}
	out := e.node.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyEgressIFB) + e.node.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB)
	if strings.Count(out, "rate 30Mbit ceil 100Mbit") != 2 || strings.Count(out, "class htb 1:2 parent 1:1 rate 70001Kbit") != 2 {
		t.Errorf("classes after repair:\n%s", out)
	}
	if res := e.pass(); res.Repaired != 0 {
		t.Errorf("a second pass repaired again: %+v", res)
	}

	// A class nobody claims (what a chained ADD killed between its join
	// and its record leaves): kept through the grace, then removed.
	sh, err := shaping.OpenNetns(e.node.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	c := shaping.Class{RequestBits: 5_000_000, CeilBits: 100_000_000}
	orphanMinor, err := sh.JoinNode(shaping.Capacity{IngressBits: 100_000_000, EgressBits: 100_000_000},
		shaping.Guarantee{Ingress: &c}, 0, g2.HostVeth, []net.IP{net.ParseIP("10.78.0.200")})
	if err != nil {
		t.Fatal(err)
	}
	orphan := fmt.Sprintf("class htb 1:%x ", orphanMinor)
	e.pass()
	if !strings.Contains(e.node.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB), orphan) {
		t.Fatal("an unclaimed class went before the grace")
	}
	now = now.Add(shaping.HierarchyGCGrace + time.Second)
	e.pass()
	out = e.node.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB) + e.node.Exec(t, "tc", "filter", "show", "dev", shaping.HierarchyIngressIFB)
	if strings.Contains(out, orphan) || strings.Contains(out, fmt.Sprintf("flowid 1:%x ", orphanMinor)) {
		t.Errorf("the unclaimed class is still there:\n%s", out)
	}
	if !strings.Contains(out, fmt.Sprintf("class htb 1:%x ", m1)) {
		t.Errorf("a claimed class went with it:\n%s", out)
	}
}
