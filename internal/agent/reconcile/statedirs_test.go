package reconcile_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
)

// network is a qoscni network of its own, beside the env's: its own
// bridge, subnet and stateDir (a directory no agent flag names).
type network struct {
	name  string
	store *state.Store
	// conf is the plugin's config as the runtime passes it.
	conf map[string]any
}

func (e *env) newNetwork(name, bridge, subnet string) *network {
	e.t.Helper()
	dir := filepath.Join(e.t.TempDir(), "state")
	return &network{name: name, store: state.New(dir), conf: map[string]any{
		"cniVersion": "1.0.0", "name": name, "type": "qoscni", "bridge": bridge, "isGateway": true, "stateDir": dir,
		"capabilities": map[string]any{"bandwidth": true, "io.kubernetes.cri.pod-annotations": true},
		"ipam": map[string]any{
			"ranges":  []any{[]any{map[string]any{"subnet": subnet}}},
			"dataDir": e.node.IPAMDir,
		},
	}}
}

// writeConflist puts the network into the CNI config dir as a conflist.
func (e *env) writeConflist(n *network) {
	e.t.Helper()
	plugin := map[string]any{}
	for k, v := range n.conf {
		if k != "name" && k != "cniVersion" {
			plugin[k] = v
		}
	}
	b, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": n.name, "plugins": []any{plugin}})
	if err := os.WriteFile(filepath.Join(e.confDir, "20-"+n.name+".conflist"), b, 0o600); err != nil {
		e.t.Fatal(err)
	}
}

var shapedBothWays = map[string]string{shaping.AnnotationIngressRate: "10M", shaping.AnnotationEgressRate: "20M"}

// assertWired checks that the pod still has its veth pair and its IFB.
func (e *env) assertWired(pod *testnet.NS, rec *state.Record) {
	t := e.t
	t.Helper()
	for _, l := range []string{rec.HostVeth, rec.Shaping.IFB} {
		if _, err := e.node.Try("ip", "link", "show", l); err != nil {
			t.Errorf("%s of %s was deleted", l, rec.Pod.Name)
		}
	}
	if out, err := pod.Try("ip", "link", "show", "eth0"); err != nil {
		t.Errorf("pod %s has no eth0: %v %s", rec.Pod.Name, err, out)
	}
}

// passes runs n passes that must neither collect nor fail.
func (e *env) passesKeep(n int) reconcile.PassResult {
	e.t.Helper()
	var res reconcile.PassResult
	for i := 0; i < n; i++ {
		if res = e.pass(); res.GCed != 0 || res.Errors != 0 {
			e.t.Errorf("pass %d: %+v", i+1, res)
		}
	}
	return res
}

// killPod deletes the pod's netns and waits until the kernel has taken its
// veth pair with it (namespaces die asynchronously).
func (e *env) killPod(pod *testnet.NS, rec *state.Record) {
	e.t.Helper()
	testnet.Run(e.t, "ip", "netns", "del", pod.Name)
	for start := time.Now(); time.Since(start) < 10*time.Second; time.Sleep(20 * time.Millisecond) {
		if _, err := e.node.Try("ip", "link", "show", rec.HostVeth); err != nil {
			return
		}
	}
	e.t.Fatalf("veth %s outlived its pod's netns", rec.HostVeth)
}

func (e *env) waitStored(n *network, rec *state.Record, what string, ok func(*state.Record) bool) {
	e.t.Helper()
	var cur *state.Record
	for start := time.Now(); time.Since(start) < 2*time.Second; time.Sleep(5 * time.Millisecond) {
		var err error
		if cur, err = n.store.Load(rec.Key()); err == nil && cur != nil && ok(cur) {
			return
		}
	}
	e.t.Fatalf("%s: not within 2 s; record: %+v", what, cur)
}

// The reproduction: a pod of a network whose stateDir is not the
// agent's --state-dir, with that network's conflist in the CNI config
// dir. The agent must keep its devices, and knows its record well enough
// to repair its shaping.
func TestGCKeepsPodOfAnotherStateDir(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{noAPI: true})
	other := e.newNetwork("qother", "qbro", "10.81.0.0/24")
	e.writeConflist(other)
	pod, rec := e.addPodTo(other.conf, other.store, "other", shapedBothWays)
	res := e.passesKeep(3)
	e.assertWired(pod, rec)
	if res.Records != 1 {
		t.Errorf("the agent does not see the record in %s: %+v", other.store.Dir, res)
	}
	e.node.Exec(t, "tc", "qdisc", "del", "dev", rec.Shaping.IFB, "root")
	if res := e.pass(); res.Repaired != 1 || res.Errors != 0 {
		t.Errorf("drift of the other network's pod: %+v", res)
	}
	if d := e.diff(rec); len(d) != 0 {
		t.Errorf("after repair: %q", d)
	}
}

// The same pod when no conflist of the config dir names its stateDir (the
// network's config came from elsewhere, e.g. a Multus
// NetworkAttachmentDefinition, or was removed) and the agent has no
// registry to find it: no record accounts for the devices, but a veth
// whose peer lives in another namespace and an IFB that its redirect
// targets are alive. Once the pod is gone, the IFB is a leftover like any
// other.
func TestGCKeepsLiveDevicesOfUnknownStateDir(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{noAPI: true})
	other := e.newNetwork("qhidden", "qbrh", "10.84.0.0/24")
	pod, rec := e.addPodTo(other.conf, other.store, "hidden", shapedBothWays)
	e.passesKeep(4)
	e.assertWired(pod, rec)
	if d := e.diff(rec); len(d) != 0 {
		t.Errorf("shaping touched: %q", d)
	}
	e.killPod(pod, rec)
	if res := e.pass(); res.GCed != 0 {
		t.Errorf("first sighting of the orphaned IFB deleted: %+v", res)
	}
	if res := e.pass(); res.GCed != 1 || res.Errors != 0 {
		t.Errorf("orphaned IFB: %+v", res)
	}
	if _, err := e.node.Try("ip", "link", "show", rec.Shaping.IFB); err == nil {
		t.Errorf("IFB %s of a pod that is gone survived", rec.Shaping.IFB)
	}
}

// Two qoscni networks with two state dirs, both in the config dir, and
// the agent's own --state-dir a third: GC keeps both pods, live reshaping
// and drift repair work for both, and each stale attachment is removed
// with its own network's store and addresses.
func TestTwoNetworksTwoStateDirs(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{configure: func(e *env, c *reconcile.Config) {
		c.StateDir = filepath.Join(e.t.TempDir(), "agent-state")
	}})
	nets := []*network{e.newNetwork("qneta", "qbra", "10.82.0.0/24"), e.newNetwork("qnetb", "qbrb", "10.83.0.0/24")}
	type podOf struct {
		net *network
		ns  *testnet.NS
		rec *state.Record
	}
	var pods []podOf
	for i, n := range nets {
		e.writeConflist(n)
		name := []string{"pa", "pb"}[i]
		ns, rec := e.addPodTo(n.conf, n.store, name, shapedBothWays)
		pods = append(pods, podOf{n, ns, rec})
	}
	if res := e.passesKeep(3); res.Records != 2 {
		t.Errorf("records seen: %+v", res)
	}
	for _, p := range pods {
		e.assertWired(p.ns, p.rec)
	}

	for _, p := range pods {
		e.annotate(p.rec.Pod.Name, map[string]string{shaping.AnnotationIngressRate: "5M", shaping.AnnotationEgressRate: "20M"})
	}
	for _, p := range pods {
		e.waitStored(p.net, p.rec, "reshape of "+p.rec.Pod.Name, func(r *state.Record) bool { return ingressRate(r) == 5_000_000 })
		if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", p.rec.HostVeth); !strings.Contains(q, "rate 5Mbit") {
			t.Errorf("%s not reshaped: %s", p.rec.Pod.Name, q)
		}
	}

	for _, p := range pods {
		e.node.Exec(t, "tc", "qdisc", "del", "dev", p.rec.Shaping.IFB, "root")
	}
	if res := e.pass(); res.Repaired != 2 || res.Errors != 0 {
		t.Errorf("drift repair: %+v", res)
	}
	for _, p := range pods {
		cur, _ := p.net.store.Load(p.rec.Key())
		if d := e.diff(cur); len(d) != 0 {
			t.Errorf("%s after repair: %q", p.rec.Pod.Name, d)
		}
	}

	for i, p := range pods {
		e.killPod(p.ns, p.rec)
		if err := e.client.CoreV1().Pods("default").Delete(context.Background(), p.rec.Pod.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // the informer sees the delete
		if res := e.pass(); res.GCed != 1 || res.Errors != 0 {
			t.Errorf("GC of %s: %+v", p.rec.Pod.Name, res)
		}
		if r, err := p.net.store.Load(p.rec.Key()); r != nil || err != nil {
			t.Errorf("record of %s left in %s (%v)", p.rec.Pod.Name, p.net.store.Dir, err)
		}
		if _, err := e.node.Try("ip", "link", "show", p.rec.Shaping.IFB); err == nil {
			t.Errorf("IFB of %s left", p.rec.Pod.Name)
		}
		ip := strings.SplitN(p.rec.IPs[0], "/", 2)[0]
		if _, err := os.Stat(filepath.Join(e.node.IPAMDir, p.net.name, ip)); err == nil {
			t.Errorf("address %s of %s still reserved", ip, p.rec.Pod.Name)
		}
		for _, q := range pods[i+1:] {
			if r, _ := q.net.store.Load(q.rec.Key()); r == nil || len(e.diff(r)) != 0 {
				t.Errorf("GC of %s touched %s", p.rec.Pod.Name, q.rec.Pod.Name)
			}
			e.assertWired(q.ns, q.rec)
		}
	}
}

// Liveness on its own, with devices made by hand: a qoscni-named veth
// whose peer sits in a pod namespace and an IFB that a redirect (clsact or
// the older ingress qdisc) of another link targets are kept without any
// record; a veth with both ends in the node namespace and an IFB nothing
// targets are collected, and so is a kept IFB once its redirect goes.
func TestGCLinkLiveness(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{noAPI: true})
	pod := e.node.NewPod(t)
	name := func(kind, id string) string {
		if kind == "veth" {
			return podnet.HostVethName(id, "eth0")
		}
		return podnet.IFBName(id, "eth0")
	}
	aliveVeth, deadVeth := name("veth", "alive"), name("veth", "dead")
	clsactIFB, ingressIFB, deadIFB := name("ifb", "clsact"), name("ifb", "ingress"), name("ifb", "dead")
	ex := func(args ...string) { e.node.Exec(t, args[0], args[1:]...) }
	ex("ip", "link", "add", aliveVeth, "type", "veth", "peer", "name", "eth0", "netns", pod.Name)
	ex("ip", "link", "add", deadVeth, "type", "veth", "peer", "name", testnet.Unique("qz"))
	for _, ifb := range []string{clsactIFB, ingressIFB, deadIFB} {
		ex("ip", "link", "add", ifb, "type", "ifb")
	}
	// Two foreign links whose ingress hooks redirect to the IFBs.
	fa, fb := testnet.Unique("fa"), testnet.Unique("fb")
	ex("ip", "link", "add", fa, "type", "veth", "peer", "name", fb)
	ex("tc", "qdisc", "add", "dev", fa, "clsact")
	ex("tc", "filter", "add", "dev", fa, "ingress", "protocol", "all", "prio", "7", "u32", "match", "u32", "0", "0",
		"action", "mirred", "egress", "redirect", "dev", clsactIFB)
	ex("tc", "qdisc", "add", "dev", fb, "handle", "ffff:", "ingress")
	ex("tc", "filter", "add", "dev", fb, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
		"action", "mirred", "egress", "redirect", "dev", ingressIFB)

	if res := e.pass(); res.GCed != 0 {
		t.Fatalf("first sighting deleted: %+v", res)
	}
	if res := e.pass(); res.GCed != 2 || res.Errors != 0 {
		t.Errorf("second pass: %+v", res)
	}
	e.passesKeep(1)
	for _, l := range []string{deadVeth, deadIFB} {
		if _, err := e.node.Try("ip", "link", "show", l); err == nil {
			t.Errorf("leftover %s survived", l)
		}
	}
	for _, l := range []string{aliveVeth, clsactIFB, ingressIFB} {
		if _, err := e.node.Try("ip", "link", "show", l); err != nil {
			t.Errorf("live %s was deleted", l)
		}
	}
	if _, err := pod.Try("ip", "link", "show", "eth0"); err != nil {
		t.Errorf("the pod lost its eth0: %v", err)
	}
	ex("tc", "filter", "del", "dev", fa, "ingress")
	e.passesKeep(1)
	if res := e.pass(); res.GCed != 1 || res.Errors != 0 {
		t.Errorf("IFB whose redirect went: %+v", res)
	}
	if _, err := e.node.Try("ip", "link", "show", clsactIFB); err == nil {
		t.Errorf("%s survived without a redirect", clsactIFB)
	}
}

// A network whose config the agent cannot read (not in the config dir)
// but whose stateDir the plugin registered at ADD: the agent finds its
// records through the registry, repairs the pod's shaping, and removes
// the attachment when the pod is gone, record included.
func TestRecordsFoundThroughRegistry(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{noAPI: true, configure: func(e *env, c *reconcile.Config) { c.StateRegistry = e.node.Registry }})
	other := e.newNetwork("qreg", "qbrr", "10.86.0.0/24")
	pod, rec := e.addPodTo(other.conf, other.store, "reg", shapedBothWays)
	dirs, errs := state.RegisteredDirs(e.node.Registry)
	if len(errs) != 0 || len(dirs) != 1 || dirs[0] != other.store.Dir {
		t.Fatalf("registry after ADD: %q %v", dirs, errs)
	}
	if res := e.passesKeep(3); res.Records != 1 {
		t.Errorf("record not found through the registry: %+v", res)
	}
	e.assertWired(pod, rec)
	e.node.Exec(t, "tc", "qdisc", "del", "dev", rec.HostVeth, "root")
	if res := e.pass(); res.Repaired != 1 || res.Errors != 0 {
		t.Errorf("drift: %+v", res)
	}
	e.killPod(pod, rec)
	if res := e.pass(); res.GCed != 1 || res.Errors != 0 {
		t.Errorf("stale attachment: %+v", res)
	}
	if r, err := other.store.Load(rec.Key()); r != nil || err != nil {
		t.Errorf("record left (%v)", err)
	}
	if _, err := e.node.Try("ip", "link", "show", rec.Shaping.IFB); err == nil {
		t.Errorf("IFB left")
	}
}

// A state directory that cannot be read may hold the record of any link:
// no link is collected until it can be read again.
func TestGCWaitsForUnreadableStateDir(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{noAPI: true})
	broken := e.newNetwork("qbroken", "qbrx", "10.88.0.0/24")
	notDir := broken.store.Dir
	if err := os.WriteFile(notDir, nil, 0o600); err != nil { // a file where the directory should be
		t.Fatal(err)
	}
	e.writeConflist(broken)
	leftover := podnet.HostVethName("leftover", "eth0")
	e.node.Exec(t, "ip", "link", "add", leftover, "type", "veth", "peer", "name", testnet.Unique("qz"))
	for i := 0; i < 3; i++ {
		if res := e.pass(); res.GCed != 0 || res.Errors == 0 {
			t.Errorf("pass %d with an unreadable state dir: %+v", i+1, res)
		}
	}
	if _, err := e.node.Try("ip", "link", "show", leftover); err != nil {
		t.Fatalf("%s collected while a state dir could not be read", leftover)
	}
	if err := os.Remove(notDir); err != nil {
		t.Fatal(err)
	}
	e.passesKeep(1)
	if res := e.pass(); res.GCed != 1 || res.Errors != 0 {
		t.Errorf("once readable: %+v", res)
	}
}
