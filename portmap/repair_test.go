package portmap

import (
	"maps"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/state"
)

func (p *pod) record(m []Mapping, provisional bool) *state.Record {
	return &state.Record{Network: "n", ContainerID: p.owner.ContainerID, IfName: p.owner.IfName,
		Pod:   state.Pod{Namespace: p.owner.PodNamespace, Name: p.owner.PodName},
		Ports: ToState(m), Provisional: provisional}
}

// The agent's repair restores what complete records hold and leaves the
// rest to ADD, DEL and GC: a provisional record's elements (an ADD under
// way writes its own), a key another attachment holds now.
func TestRepairerFollowsRecords(t *testing.T) {
	w := newWorld(t)
	dir := t.TempDir()
	w.m.localnetDir = dir
	p1, p2, p3 := w.addPod(t), w.addPod(t), w.addPod(t)
	serve(t, p1.ns, 80, "pod1")
	m1, m2, m3 := plan(t, p1, tcp(8080, 80)), plan(t, p2, tcp(8090, 80)), plan(t, p3, tcp(8080, 80))
	w.add(t, p1, m1)
	w.add(t, p2, m2)
	r := NewRepairer(w.nodeFd, []string{dir}, nil)
	live := []*state.Record{p1.record(m1, false), p2.record(m2, true)}
	repair := func(want map[string]int) {
		t.Helper()
		got, err := r.Repair(live, nil)
		if err != nil {
			t.Fatal(err)
		}
		maps.DeleteFunc(got, func(_ string, n int) bool { return n == 0 })
		if !maps.Equal(got, want) {
			t.Fatalf("Repair restored %v, want %v", got, want)
		}
	}
	repair(map[string]int{})

	w.nft(t, "flush", "ruleset")
	// Both families: two map elements, two hairpin elements.
	repair(map[string]int{RepairBase: 1, RepairHostPort: 4})
	if err := w.m.Check(p1.owner, m1); err != nil {
		t.Fatalf("p1 after repair: %v", err)
	}
	mustTCP(t, w.client.Path, nodeAddr4+":8080", "pod1")
	if err := w.m.Check(p2.owner, m2); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("provisional p2's elements restored: %v", err)
	}

	// p1's element lost, and another pod's ADD took the port since.
	for _, set := range []string{setAny4, setAny6} {
		w.nft(t, "delete", "element", "inet", "qoscni", set, "{", "tcp", ".", "8080", "}")
	}
	w.add(t, p3, m3)
	repair(map[string]int{})
	if err := w.m.Check(p3.owner, m3); err != nil {
		t.Fatalf("repair took p3's port: %v", err)
	}

	// The localnet guard, from the marker ADD left.
	w.node.Exec(t, "tc", "qdisc", "del", "dev", w.bridge, "clsact")
	repair(map[string]int{RepairGuard: 1})
	if err := w.m.CheckLocalnet(w.bridge); err != nil {
		t.Fatal(err)
	}
}

// Markers say where qoscni relies on route_localnet and whether it set
// it; the agent's repair restores a missing guard from them and drops
// markers whose interface is gone.
func TestLocalnetMarkersAndGuardRepair(t *testing.T) {
	w := newWorld(t)
	dir := t.TempDir()
	w.m.localnetDir = dir
	p := w.addPod(t)
	const preset = "brk" // route_localnet=1 before qoscni (kube-proxy, say)
	w.node.Exec(t, "ip", "link", "add", preset, "type", "bridge")
	w.node.Exec(t, "sysctl", "-qw", "net.ipv4.conf."+preset+".route_localnet=1")
	w.add(t, p, plan(t, p, tcp(8080, 80)))
	w.add(t, p, plan(t, p, tcp(8080, 80))) // again: the marker keeps what the first saw
	if err := w.m.Add(Owner{ContainerID: "other", IfName: "eth0"}, preset, plan(t, p, tcp(8081, 80))); err != nil {
		t.Fatal(err)
	}
	markers, bad, err := readMarkers(dir)
	if err != nil || len(bad) > 0 || len(markers) != 2 {
		t.Fatalf("markers %+v, bad %v, %v", markers, bad, err)
	}
	for _, mk := range markers {
		if want := mk.IfName == w.bridge; mk.SetRouteLocalnet != want || !mk.CreatedClsact {
			t.Errorf("marker %+v: want setRouteLocalnet %v and createdClsact", mk, want)
		}
	}

	w.node.Exec(t, "tc", "qdisc", "del", "dev", w.bridge, "clsact")
	w.node.Exec(t, "ip", "link", "del", preset)
	res, err := repairGuards(w.nodeFd, []string{dir})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.restored) != 1 || res.restored[0] != w.bridge || res.marked != 1 || len(res.dropped) != 1 {
		t.Fatalf("repair: %+v", res)
	}
	if err := w.m.CheckLocalnet(w.bridge); err != nil {
		t.Fatalf("after repair: %v", err)
	}
	if res, err := repairGuards(w.nodeFd, []string{dir}); err != nil || len(res.restored) != 0 {
		t.Fatalf("second repair: %+v, %v", res, err)
	}
}
