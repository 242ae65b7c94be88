package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/testnet"
)

// qoscni chained after a main plugin that keeps its own filter on the
// host veth's ingress hook at priority 1, protocol all (as Calico eBPF and
// Cilium attach theirs): ADD, CHECK and DEL leave it alone; a root qdisc
// of the main plugin's makes ADD fail with an error naming it and nothing
// changed.
func TestChainedBesideNeighbour(t *testing.T) {
	t.Parallel()
	requireRefPlugins(t, "ptp")
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	mainConf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "qtest", "type": "ptp",
		"ipam": map[string]any{"type": "host-local", "ranges": []any{[]any{map[string]any{"subnet": "10.86.0.0/24"}}}, "dataDir": filepath.Join(n.Dir, "hl")},
	})
	env := []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=nb", "CNI_NETNS=" + pod.Path, "CNI_IFNAME=eth0", "CNI_PATH=/usr/lib/cni"}
	prev := runRefPlugin(t, n, "ptp", env, mainConf)
	t.Cleanup(func() {
		del := append([]string{"CNI_COMMAND=DEL"}, env[1:]...)
		runRefPlugin(t, n, "ptp", del, mainConf)
	})
	var res struct {
		Interfaces []struct{ Name, Sandbox string }
	}
	if err := json.Unmarshal(prev, &res); err != nil {
		t.Fatal(err)
	}
	veth := ""
	for _, i := range res.Interfaces {
		if i.Sandbox == "" {
			veth = i.Name
		}
	}
	if veth == "" {
		t.Fatalf("no host interface in %s", prev)
	}
	n.Exec(t, "tc", "qdisc", "add", "dev", veth, "clsact")
	n.Exec(t, "tc", "filter", "add", "dev", veth, "ingress", "prio", "1", "protocol", "all",
		"u32", "match", "ip", "dst", "192.0.2.99/32", "flowid", "1:5")
	neighbour := func(step string) {
		t.Helper()
		f := n.Exec(t, "tc", "filter", "show", "dev", veth, "ingress")
		if !strings.Contains(f, "pref 1 u32") || !strings.Contains(f, "c0000263/ffffffff") {
			t.Fatalf("%s removed the main plugin's filter from %s:\n%s", step, veth, f)
		}
		if q := n.Exec(t, "tc", "qdisc", "show", "dev", veth); !strings.Contains(q, "clsact") {
			t.Fatalf("%s removed the main plugin's clsact from %s:\n%s", step, veth, q)
		}
	}
	base := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"qtest","type":"qoscni","stateDir":%q,
		"ingressRate":8000000,"ingressBurst":80000,"egressRate":4000000,"egressBurst":40000}`, n.StateDir)
	conf := withPrev(t, []byte(base), prev)
	call := func(cmd string) testnet.Result {
		return n.Invoke(t, testnet.Call{Command: cmd, ContainerID: "nb", Netns: pod.Path, IfName: "eth0", Config: conf})
	}

	call("ADD").MustSucceed(t, "chained ADD")
	neighbour("ADD")
	rec := readRecord(t, n, "nb")
	if f := n.Exec(t, "tc", "filter", "show", "dev", veth, "ingress"); !strings.Contains(f, "Redirect to device "+rec.Shaping.IFB) {
		t.Fatalf("no redirect to %s:\n%s", rec.Shaping.IFB, f)
	}
	call("CHECK").MustSucceed(t, "chained CHECK")
	call("DEL").MustSucceed(t, "chained DEL")
	neighbour("DEL")
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", veth); strings.Contains(q, "tbf") {
		t.Errorf("our shaper left on %s:\n%s", veth, q)
	}
	if f := n.Exec(t, "tc", "filter", "show", "dev", veth, "ingress"); strings.Contains(f, "mirred") {
		t.Errorf("our redirect left on %s:\n%s", veth, f)
	}
	if _, err := n.Try("ip", "link", "show", rec.Shaping.IFB); err == nil {
		t.Error("IFB survived chained DEL")
	}

	// The main plugin's own root qdisc: qoscni will not replace it.
	n.Exec(t, "tc", "qdisc", "add", "dev", veth, "root", "handle", "5:", "htb")
	before := n.Qdiscs(t, veth)
	r := call("ADD")
	if !r.Failed || r.Err.Code != types.ErrInvalidNetworkConfig {
		t.Fatalf("chained ADD over a foreign root qdisc: failed=%v %+v, want CNI error %d", r.Failed, r.Err, types.ErrInvalidNetworkConfig)
	}
	t.Logf("refused: code %d: %s", r.Err.Code, r.Err.Msg)
	for _, w := range []string{veth, "htb", "5:"} {
		if !strings.Contains(r.Err.Msg, w) {
			t.Errorf("error %q does not name %q", r.Err.Msg, w)
		}
	}
	if after := n.Qdiscs(t, veth); after != before {
		t.Errorf("refused ADD changed %s's qdiscs:\nbefore %s\nafter %s", veth, before, after)
	}
	neighbour("refused ADD")
	if f := n.Exec(t, "tc", "filter", "show", "dev", veth, "ingress"); strings.Contains(f, "mirred") {
		t.Errorf("refused ADD left a redirect:\n%s", f)
	}
	if _, err := n.Try("ip", "link", "show", rec.Shaping.IFB); err == nil {
		t.Error("refused ADD left an IFB")
	}
	if _, err := os.Stat(filepath.Join(n.StateDir, "qtest", "nb_eth0.json")); err == nil {
		t.Error("refused ADD left a record")
	}
	call("DEL").MustSucceed(t, "DEL after a refused ADD")
	if after := n.Qdiscs(t, veth); after != before {
		t.Errorf("DEL after a refused ADD changed %s's qdiscs:\nbefore %s\nafter %s", veth, before, after)
	}
}
