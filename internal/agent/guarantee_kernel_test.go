package agent

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
)

// tcClass reads one class's counters from tc -s's text: Sent bytes and
// pkt, dropped, overlimits, lended, borrowed.
func tcClass(t *testing.T, node *testnet.Node, dev, classid string) map[string]float64 {
	t.Helper()
	out := node.Exec(t, "tc", "-s", "class", "show", "dev", dev, "classid", classid)
	f := strings.Fields(strings.NewReplacer("(", " ", ")", " ", ",", " ").Replace(out))
	m := map[string]float64{}
	for i := 0; i+1 < len(f); i++ {
		key := map[string]string{"Sent": "bytes", "bytes": "packets", "dropped": "drops", "overlimits": "overlimits",
			"lended:": "lends", "borrowed:": "borrows"}[f[i]]
		if key == "" {
			continue
		}
		if _, done := m[key]; done {
			continue // "requeues" etc. repeat on the backlog line
		}
		v, err := strconv.ParseFloat(f[i+1], 64)
		if err != nil {
			t.Fatalf("%s in %q: %v", f[i], out, err)
		}
		m[key] = v
	}
	if len(m) != 6 {
		t.Fatalf("class %s on %s: read %v from %q", classid, dev, m, out)
	}
	// A leaf that cuts GSO packets counts its drops in frames, in its TBF
	// (HTB hears of a cut packet's drop only when every frame went): those
	// are the class's drops qoscni reports (docs/guarantees.md).
	leaf := node.Exec(t, "tc", "-s", "qdisc", "show", "dev", dev, "parent", classid)
	if strings.HasPrefix(leaf, "qdisc tbf ") {
		f := strings.Fields(strings.NewReplacer("(", " ", ")", " ", ",", " ").Replace(leaf))
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "dropped" {
				v, err := strconv.ParseFloat(f[i+1], 64)
				if err != nil {
					t.Fatalf("dropped in %q: %v", leaf, err)
				}
				m["drops"] = v
				break
			}
		}
	}
	return m
}

// Pods that joined the node hierarchy through the plugin are on the
// agent's /metrics with their class's counters as tc shows them, their
// request, limit and priority, and the node's capacity, requests and
// headroom; the status table shows the same; a pod's series go with it.
func TestAgentGuaranteeMetrics(t *testing.T) {
	node := testnet.NewNode(t)
	plugin := map[string]any{
		"cniVersion": "1.1.0", "name": "qgnet", "type": "qoscni", "bridge": "qbrg", "isGateway": true, "stateDir": node.StateDir,
		"capabilities": map[string]any{"io.kubernetes.cri.pod-annotations": true},
		"nodeCapacity": map[string]any{"ingress": "40M", "egress": "40M"},
		"ipam":         map[string]any{"ranges": []any{[]any{map[string]any{"subnet": "10.89.0.0/24"}}}, "dataDir": node.IPAMDir},
	}
	plain, _ := json.Marshal(plugin)
	add := func(cid, name string, ann map[string]string) (*testnet.NS, *state.Record) {
		pod := node.NewPod(t)
		conf := map[string]any{}
		for k, v := range plugin {
			conf[k] = v
		}
		conf["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": ann}
		b, _ := json.Marshal(conf)
		node.Invoke(t, testnet.Call{Command: "ADD", ContainerID: cid, Netns: pod.Path, IfName: "eth0",
			Args: "K8S_POD_NAMESPACE=team-g;K8S_POD_NAME=" + name + ";K8S_POD_UID=u" + cid, Config: b}).MustSucceed(t, "ADD "+name)
		t.Cleanup(func() {
			node.Invoke(t, testnet.Call{Command: "DEL", ContainerID: cid, Netns: pod.Path, IfName: "eth0", Config: plain})
		})
		rec, err := state.New(node.StateDir).Load(state.Key{Network: "qgnet", ContainerID: cid, IfName: "eth0"})
		if err != nil || rec == nil || rec.Shaping == nil || rec.Shaping.Guarantee == nil {
			t.Fatalf("record of %s: %+v %v", name, rec, err)
		}
		return pod, rec
	}
	gold, goldRec := add("cgold", "gold", map[string]string{
		shaping.AnnotationIngressRequest: "10M", shaping.AnnotationEgressRequest: "10M",
		"kubernetes.io/egress-bandwidth": "20M", shaping.AnnotationPriority: "high"})
	_, beRec := add("cbe", "be", map[string]string{shaping.AnnotationPriority: "low"})
	classid := fmt.Sprintf("1:%x", goldRec.Shaping.Guarantee.Minor)

	srv := startAgent(t, node, "")
	gout := map[string]string{"namespace": "team-g", "pod": "gold", "interface": "eth0", "direction": "egress"}
	gin := map[string]string{"namespace": "team-g", "pod": "gold", "interface": "eth0", "direction": "ingress"}
	beIn := map[string]string{"namespace": "team-g", "pod": "be", "interface": "eth0", "direction": "ingress"}

	// 4 MB out of gold, to the node: above its 10 Mbit/s request, so it
	// borrows, and at its 20 Mbit/s limit, so it throttles.
	gw := strings.SplitN(goldRec.Gateways[0], "/", 2)[0]
	const payload = 4 << 20
	t0 := time.Now()
	transfer(t, node.Path, gw, gold.Path, payload)
	took := time.Since(t0)
	// 4 MiB at 20 Mbit/s takes 1.7 s; at 10 (no borrowing) 3.4.
	t.Logf("4 MiB out of gold in %v (%.1f Mbit/s)", took, payload*8/took.Seconds()/1e6)
	if took < 1200*time.Millisecond {
		t.Errorf("4 MiB in %v: faster than gold's 20 Mbit/s limit", took)
	}

	before := tcClass(t, node, shaping.HierarchyEgressIFB, classid)
	s := scrapeAgent(t, srv.Addr())
	after := tcClass(t, node, shaping.HierarchyEgressIFB, classid)
	for key, name := range map[string]string{"bytes": "qoscni_guarantee_sent_bytes_total", "packets": "qoscni_guarantee_sent_packets_total",
		"drops": "qoscni_guarantee_dropped_packets_total", "overlimits": "qoscni_guarantee_overlimits_total",
		"lends": "qoscni_guarantee_htb_lends_total", "borrows": "qoscni_guarantee_htb_borrows_total"} {
		v := s.must(t, name, gout)
		if v < before[key] || v > after[key] {
			t.Errorf("%s = %v, tc shows %v then %v", name, v, before[key], after[key])
		}
	}
	if v := s.must(t, "qoscni_guarantee_sent_bytes_total", gout); v < payload {
		t.Errorf("gold's class sent %v bytes, less than the %d of payload", v, payload)
	}
	if b := s.must(t, "qoscni_guarantee_htb_borrows_total", gout); b == 0 || s.must(t, "qoscni_guarantee_overlimits_total", gout) == 0 {
		t.Errorf("gold sent above its request up to its limit: borrows %v, overlimits %v", b, s.must(t, "qoscni_guarantee_overlimits_total", gout))
	}
	t.Logf("gold egress: tc %v", after)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"qoscni_guarantee_request_bytes_per_second", gout, 10e6 / 8},
		{"qoscni_guarantee_request_bytes_per_second", gin, 10e6 / 8},
		{"qoscni_guarantee_limit_bytes_per_second", gout, 20e6 / 8},
		{"qoscni_guarantee_limit_bytes_per_second", gin, 40e6 / 8}, // no ingress limit: the capacity
		{"qoscni_guarantee_request_bytes_per_second", beIn, 0},
		{"qoscni_guarantee_limit_bytes_per_second", beIn, 40e6 / 8},
		{"qoscni_guarantee_class_up", gout, 1},
		{"qoscni_guarantee_class_up", beIn, 1},
		{"qoscni_guarantee_priority", map[string]string{"pod": "gold", "direction": "egress", "priority": "high"}, 1},
		{"qoscni_guarantee_priority", map[string]string{"pod": "be", "direction": "ingress", "priority": "low"}, 1},
		{"qoscni_guarantee_node_capacity_bytes_per_second", map[string]string{"direction": "ingress"}, 40e6 / 8},
		{"qoscni_guarantee_node_requests_bytes_per_second", map[string]string{"direction": "egress"}, 10e6 / 8},
		{"qoscni_guarantee_node_headroom_bytes_per_second", map[string]string{"direction": "egress"}, 30e6 / 8},
	} {
		if v := s.must(t, c.name, c.labels); v != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, v, c.want)
		}
	}
	if _, ok := s.value("qoscni_shaping_qdisc_up", gout); ok {
		t.Error("a pod in the node hierarchy has per-pod pipeline series")
	}
	promtool := requireTool(t, "promtool")
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(s.text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// The status table: both pods both ways, and the node lines.
	rows, err := Status(cniconf.StateSources{Own: node.StateDir}, node.Path, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	var gold0, node0 *StatusRow
	for i := range rows {
		r := &rows[i]
		switch {
		case r.Pod == "gold" && r.Direction == "egress":
			gold0 = r
		case r.Scope == ScopeNode && r.Direction == "ingress":
			node0 = r
		}
	}
	if len(rows) != 6 || gold0 == nil || node0 == nil {
		t.Fatalf("status rows %+v", rows)
	}
	if gold0.RequestBits != 10e6 || gold0.LimitBits != 20e6 || gold0.Priority != "high" || gold0.Class != classid ||
		gold0.Device != shaping.HierarchyEgressIFB || !gold0.QdiscFound {
		t.Errorf("gold's status row %+v", *gold0)
	}
	if node0.CapacityBits != 40e6 || node0.ReservedBits != 10e6 || node0.HeadroomBits == nil || *node0.HeadroomBits != 30e6 {
		t.Errorf("node status row %+v", *node0)
	}
	var table strings.Builder
	if err := WriteStatus(&table, rows, false); err != nil {
		t.Fatal(err)
	}
	t.Logf("status:\n%s", table.String())

	// be leaves: its series go, the requests stay gold's.
	node.Invoke(t, testnet.Call{Command: "DEL", ContainerID: beRec.ContainerID, IfName: "eth0", Config: plain}).MustSucceed(t, "DEL be")
	s = scrapeAgent(t, srv.Addr())
	for _, name := range []string{"qoscni_guarantee_request_bytes_per_second", "qoscni_guarantee_class_up", "qoscni_guarantee_sent_bytes_total"} {
		if _, ok := s.value(name, beIn); ok {
			t.Errorf("%s still exported after be went away", name)
		}
	}
	if v := s.must(t, "qoscni_guarantee_node_requests_bytes_per_second", map[string]string{"direction": "ingress"}); v != 10e6/8 {
		t.Errorf("requests after be left = %v", v)
	}
}
