package reliability_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
	"github.com/qoscni/qoscni/test/reliability/reltest"
)

// point is where the plugin dies: "<op>:<step>[@n]" (internal/fault).
type point struct {
	op, step string
	n        int // the n-th visit; 0 = the first
}

func (p point) String() string {
	s := p.op + ":" + p.step
	if p.n > 1 {
		s += fmt.Sprintf("@%d", p.n)
	}
	return s
}

// The steps of internal/cni/plugin/add.go and internal/cni/plugin/del.go (steps.mark), in order.
var (
	addStepsBeforeShaping = []string{"open", "provisional", "ipam", "bridge", "veth-created", "veth", "pod", "sysctl"}
	addStepsAfterShaping  = []string{"shaping", "masq", "ports", "controls", "state"}
	delSteps              = []string{"veth", "masq", "ports", "state", "ipam"}
)

// killPoints are every ADD step (with policy, its pending step after
// IPAM), every shaping action ADD makes for the profile
// (shape:1..shapeSteps) and every DEL step.
func killPoints(shapeSteps int, policy bool) []point {
	var pts []point
	for _, s := range addStepsBeforeShaping {
		pts = append(pts, point{op: "ADD", step: s})
		if s == "ipam" && policy {
			pts = append(pts, point{op: "ADD", step: "policy"})
		}
	}
	for i := 1; i <= shapeSteps; i++ {
		pts = append(pts, point{op: "shape", step: fmt.Sprint(i)})
	}
	for _, s := range addStepsAfterShaping {
		pts = append(pts, point{op: "ADD", step: s})
	}
	for _, s := range delSteps {
		pts = append(pts, point{op: "DEL", step: s})
	}
	return pts
}

// What a runtime does after the plugin died.
const (
	actDel       = "del"        // DEL with the netns
	actDelTwice  = "del-twice"  // DEL with the netns, then containerd's DEL without netns and runtimeConfig
	actNetnsGone = "netns-gone" // the pod netns is deleted, then DEL without netns
	actGC        = "gc"         // CNI GC with an empty valid-attachments list
	// The pod netns is deleted, then CNI GC with an empty valid-attachments
	// list (the runtime restarted after the sandbox was gone).
	actNetnsGoneGC = "netns-gone-gc"
)

// tally counts one action group's trials.
type tally struct {
	mu       sync.Mutex
	trials   int
	leaky    int
	failures int
	notes    []string
	// observations are findings that are not leaks of the node.
	observations []string
}

func (c *tally) observe(note string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.observations = append(c.observations, note)
}

func (c *tally) record(trial string, leaked bool, failed []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.trials++
	if leaked {
		c.leaky++
	}
	if len(failed) > 0 {
		c.failures++
	}
	if leaked || len(failed) > 0 {
		c.notes = append(c.notes, trial)
	}
}

// shapeSteps finds how many shaping actions ADD makes for p: the largest
// k for which QOSCNI_FAULT=shape:k kills it.
func shapeSteps(t *testing.T, node *testnet.Node, p profile) int {
	t.Helper()
	for k := 1; ; k++ {
		cid := testnet.Unique("probe")
		pod := newPodNS(t)
		c := call{cmd: "ADD", cid: cid, netns: pod.Path, ifname: "eth0", args: podArgs(cid), conf: addConf(node, p), fault: fmt.Sprintf("shape:%d", k)}
		r := invoke(t, node, c)
		if !r.failed {
			// A fully added pod holds something of every kind: both
			// counters must see the same.
			crossCheck(t, node)
		}
		del := c
		del.cmd, del.fault = "DEL", ""
		if d := invoke(t, node, del); d.failed {
			t.Fatalf("probe DEL after shape:%d: %s", k, d)
		}
		if l := countLeaks(t, node); l.total() > 0 {
			t.Fatalf("probe for shape:%d left %s", k, l)
		}
		if !r.killed {
			if r.failed {
				t.Fatalf("probe ADD with shape:%d: %s", k, r)
			}
			return k - 1
		}
		if k > 20 {
			t.Fatal("more than 20 shaping actions in one ADD")
		}
	}
}

// TestPluginFault kills the plugin at every step of ADD and DEL, for pods
// with and without shaping and hostPorts, follows with what a runtime
// does, and checks that nothing is left and the pod can be added again.
// Subtests: <action>/<profile>/<point>, e.g.
//
//	go test -run 'TestPluginFault/^gc$/full/^ADD:veth$' ./reliability/
func TestPluginFault(t *testing.T) {
	t.Parallel()
	start := time.Now()
	probe := testnet.NewNode(t)
	taggedBinary(t, "qoscni")
	profiles := []profile{profFull, profEgress, profPlain}
	points := map[string][]point{}
	for _, p := range profiles {
		n := 0
		if p.ingress || p.egress {
			n = shapeSteps(t, probe, p)
			if n == 0 {
				t.Fatalf("profile %s: ADD made no shaping action", p.name)
			}
		}
		points[p.name] = killPoints(n, p.policy)
		t.Logf("profile %s: %d shaping actions, %d kill points", p.name, n, len(points[p.name]))
	}

	var mu sync.Mutex
	var total, leaky, failures int
	t.Cleanup(func() {
		t.Logf("SUMMARY plugin: %d trials, %d with leaks, %d with failures, %s", total, leaky, failures, time.Since(start).Round(time.Second))
	})
	report := func(action string, c *tally, began time.Time) {
		mu.Lock()
		total += c.trials
		leaky += c.leaky
		failures += c.failures
		mu.Unlock()
		t.Logf("SUMMARY action %-10s: %3d trials, %d with leaks, %d with failures (%s)", action, c.trials, c.leaky, c.failures, time.Since(began).Round(time.Second))
		for _, n := range c.notes {
			t.Logf("  %s: %s", action, n)
		}
		if len(c.observations) > 0 {
			t.Logf("  %s: %d observations (not leaks), e.g. %s", action, len(c.observations), c.observations[0])
		}
	}

	// The groups run side by side, each on its own node: t.Run from
	// goroutines, as -parallel defaults to the 2 CPUs and most of a trial
	// is waiting for the kernel (veth deletion) and for process start.
	var wg sync.WaitGroup
	sem := make(chan struct{}, groupParallel())
	group := func(name string, body func(t *testing.T, node *testnet.Node, c *tally)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			t.Run(name, func(t *testing.T) {
				began := time.Now()
				// One node per group: each trial's leak check proves the
				// node clean for the next; a leaky trial scrubs it.
				node := testnet.NewNode(t)
				c := &tally{}
				defer func() { report(name, c, began) }()
				body(t, node, c)
				// The in-process count against ip, tc and nft at the end.
				crossCheck(t, node)
			})
		}()
	}
	for _, action := range []string{actDel, actDelTwice, actNetnsGone, actGC, actNetnsGoneGC} {
		group(action, func(t *testing.T, node *testnet.Node, c *tally) {
			for _, p := range profiles {
				if action == actNetnsGoneGC && p.name != profFull.name {
					continue // beyond the brief: one profile, for time
				}
				t.Run(p.name, func(t *testing.T) {
					for _, pt := range points[p.name] {
						t.Run(pt.String(), func(t *testing.T) {
							pluginTrial(t, node, p, pt, action, c)
						})
					}
				})
			}
		})
	}
	group("gc-killed", func(t *testing.T, node *testnet.Node, c *tally) {
		for _, step := range []string{"veth", "masq", "ports", "state"} {
			for n := 1; n <= 2; n++ {
				pt := point{op: "DEL", step: step, n: n}
				t.Run(pt.String(), func(t *testing.T) { gcKilledTrial(t, node, pt, c) })
			}
		}
	})
	if _, err := os.Stat(filepath.Join(refPluginDir, "bridge")); err == nil {
		group("chained", func(t *testing.T, node *testnet.Node, c *tally) {
			for _, pt := range chainedPoints(t, node) {
				for _, act := range []string{actDel, actDelTwice} {
					t.Run(act+"/"+pt.String(), func(t *testing.T) { chainedTrial(t, node, pt, act == actDelTwice, c) })
				}
			}
		})
	} else if msg := fmt.Sprintf("chained mode not covered: reference plugins missing in %s (apt-get install containernetworking-plugins)", refPluginDir); os.Getenv(testnet.RequireRootEnv) != "" {
		t.Error(msg)
	} else {
		t.Log(msg)
	}
	wg.Wait()
}

// pluginTrial: kill at pt, recover with action, count; then ADD and DEL
// the same attachment again and count once more.
func pluginTrial(t *testing.T, node *testnet.Node, p profile, pt point, action string, c *tally) {
	cid := testnet.Unique("rel")
	pod := newPodNS(t)
	conf := addConf(node, p)
	base := call{cid: cid, netns: pod.Path, ifname: "eth0", args: podArgs(cid), conf: conf}
	var failed []string
	fail := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		failed = append(failed, msg)
		t.Error(msg)
	}
	run := func(what string, cl call) result {
		r := invoke(t, node, cl)
		if r.failed {
			fail("%s: %s", what, r)
		}
		return r
	}
	withFault := func(cl call, cmd string) call {
		cl.cmd, cl.fault = cmd, pt.String()
		return cl
	}
	with := func(cl call, cmd string) call {
		cl.cmd = cmd
		return cl
	}

	// The kill.
	if pt.op == "DEL" {
		if r := run("ADD before the DEL kill", with(base, "ADD")); r.failed {
			scrub(t, node)
			c.record(fmt.Sprintf("%s/%s: %s", p.name, pt, strings.Join(failed, "; ")), false, failed)
			return
		}
		if r := invoke(t, node, withFault(base, "DEL")); !r.killed {
			fail("DEL with %s was not killed: %s", pt, r)
		}
	} else if r := invoke(t, node, withFault(base, "ADD")); !r.killed {
		fail("ADD with %s was not killed: %s", pt, r)
	}

	// What the runtime does next.
	plain := base
	plain.conf, plain.netns = plainConf(node), ""
	switch action {
	case actDel:
		run("DEL", with(base, "DEL"))
	case actDelTwice:
		run("DEL", with(base, "DEL"))
		run("second DEL (no netns, no runtimeConfig)", with(plain, "DEL"))
	case actNetnsGone:
		deletePodNS(t, pod)
		waitVethGone(t, node, cid)
		run("DEL without netns", with(plain, "DEL"))
	case actGC:
		run("GC", call{cmd: "GC", conf: standaloneNet.GCConf(node)})
	case actNetnsGoneGC:
		deletePodNS(t, pod)
		waitVethGone(t, node, cid)
		run("GC", call{cmd: "GC", conf: standaloneNet.GCConf(node)})
	}
	first := countLeaks(t, node)
	if first.total() > 0 {
		t.Errorf("after the kill at %s and %s, left: %s", pt, action, first)
	}

	// The next ADD of the same attachment, into a live netns.
	next := base
	if action == actNetnsGone || action == actNetnsGoneGC {
		pod2 := newPodNS(t)
		next.netns = pod2.Path
	}
	if r := run("next ADD of the same attachment", with(next, "ADD")); !r.failed {
		run("DEL after the next ADD", with(next, "DEL"))
	} else {
		invoke(t, node, with(next, "DEL"))
	}
	second := countLeaks(t, node)
	if second.total() > 0 {
		t.Errorf("after the next ADD and DEL, left: %s", second)
	}
	c.finish(t, node, fmt.Sprintf("%s/%s:", p.name, pt), "next ADD+DEL", first, second, failed)
}

// gcKilledTrial kills CNI GC itself while it tears down the n-th of two
// stale attachments, then runs GC again.
func gcKilledTrial(t *testing.T, node *testnet.Node, pt point, c *tally) {
	var failed []string
	fail := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		failed = append(failed, msg)
		t.Error(msg)
	}
	var atts []call
	for _, p := range []profile{profFull, profEgress} {
		cid := testnet.Unique("relgc")
		pod := newPodNS(t)
		a := call{cmd: "ADD", cid: cid, netns: pod.Path, ifname: "eth0", args: podArgs(cid), conf: addConf(node, p)}
		if r := invoke(t, node, a); r.failed {
			fail("ADD %s: %s", p.name, r)
		}
		atts = append(atts, a)
	}
	if r := invoke(t, node, call{cmd: "GC", conf: standaloneNet.GCConf(node), fault: pt.String()}); !r.killed {
		fail("GC with %s was not killed: %s", pt, r)
	}
	if r := invoke(t, node, call{cmd: "GC", conf: standaloneNet.GCConf(node)}); r.failed {
		fail("GC after the killed GC: %s", r)
	}
	first := countLeaks(t, node)
	if first.total() > 0 {
		t.Errorf("after GC killed at %s and GC again, left: %s", pt, first)
	}
	for _, a := range atts {
		next := a
		if r := invoke(t, node, next); r.failed {
			fail("next ADD of %s: %s", a.cid, r)
		}
		next.cmd = "DEL"
		if r := invoke(t, node, next); r.failed {
			fail("DEL of %s: %s", a.cid, r)
		}
	}
	second := countLeaks(t, node)
	if second.total() > 0 {
		t.Errorf("after the next ADDs and DELs, left: %s", second)
	}
	c.finish(t, node, pt.String()+":", "next ADDs+DELs", first, second, failed)
}

// finish records one trial: what leaked after the recovery (first) and
// after the next ADD and DEL (second), and what failed; a node that leaked
// is scrubbed for the next trial.
func (c *tally) finish(t *testing.T, node *testnet.Node, label, next string, first, second leaks, failed []string) {
	leaked := first.total() > 0 || second.total() > 0
	if leaked {
		scrub(t, node)
	}
	note := label
	if first.total() > 0 {
		note += " leaked " + first.String() + "."
	}
	if second.total() > 0 {
		note += " after " + next + ": " + second.String() + "."
	}
	if len(failed) > 0 {
		note += " failures: " + strings.Join(failed, "; ")
	}
	c.record(note, leaked, failed)
}

// groupParallel is how many trial groups run at once (env
// QOSCNI_RELIABILITY_PARALLEL, default 3).
func groupParallel() int {
	if n, err := strconv.Atoi(os.Getenv("QOSCNI_RELIABILITY_PARALLEL")); err == nil && n > 0 {
		return n
	}
	return 3
}

// Chained mode: qoscni after the reference bridge plugin (host-local
// IPAM), as containerd runs a conflist: ADD in order, DEL in reverse.
const refPluginDir = "/usr/lib/cni"

func refBridgeConf(node *testnet.Node) []byte {
	return reltest.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": network, "type": "bridge", "bridge": refBridge, "isGateway": true,
		"ipam": map[string]any{"type": "host-local", "ranges": []any{[]any{map[string]any{"subnet": "10.80.0.0/24"}}},
			"dataDir": hostLocalDir(node)},
	})
}

// chainedConf is qoscni's entry with the main plugin's result; prev nil =
// containerd's second DEL (no cached result).
func chainedConf(node *testnet.Node, runtime bool, prev []byte) []byte {
	c := map[string]any{"cniVersion": "1.0.0", "name": network, "type": "qoscni", "stateDir": node.StateDir,
		"capabilities": map[string]any{"bandwidth": true, "portMappings": true, "io.kubernetes.cri.pod-annotations": true}}
	if runtime {
		c["runtimeConfig"] = map[string]any{
			"bandwidth":    map[string]any{"ingressRate": 10_000_000, "ingressBurst": 4294967295, "egressRate": 20_000_000, "egressBurst": 4294967295},
			"portMappings": []any{profFull.ports[0], profFull.ports[1]},
			"io.kubernetes.cri.pod-annotations": map[string]string{
				shaping.AnnotationIngressPacketRate: "5k", shaping.AnnotationEgressMaxConnections: "100", shaping.AnnotationDSCP: "AF41",
			},
		}
	}
	if prev != nil {
		var p map[string]any
		if err := json.Unmarshal(prev, &p); err != nil {
			panic(err)
		}
		c["prevResult"] = p
	}
	return reltest.Marshal(c)
}

// chainedAttachment runs the chain for one pod.
type chainedAttachment struct {
	node *testnet.Node
	base call // cid, netns, ifname, args
	prev []byte
}

func (a *chainedAttachment) main(t *testing.T, cmd string, netns string) result {
	c := a.base
	c.cmd, c.netns, c.conf, c.args = cmd, netns, refBridgeConf(a.node), ""
	r := invokeBin(t, a.node, filepath.Join(refPluginDir, "bridge"), refPluginDir, c)
	if cmd == "ADD" && !r.failed {
		a.prev = r.stdout
	}
	return r
}

func (a *chainedAttachment) qoscni(t *testing.T, cmd, netns, fault string, withPrev bool) result {
	c := a.base
	c.cmd, c.netns, c.fault = cmd, netns, fault
	var prev []byte
	if withPrev {
		prev = a.prev
	}
	c.conf = chainedConf(a.node, withPrev, prev)
	return invoke(t, a.node, c)
}

// chainedPoints: the shaping actions and marks of chained ADD, and the
// DEL steps a chained record goes through (no address release: the main
// plugin's IPAM owns them).
func chainedPoints(t *testing.T, node *testnet.Node) []point {
	t.Helper()
	shapes := 0
	for k := 1; ; k++ {
		pod := newPodNS(t)
		cid := testnet.Unique("probe")
		a := &chainedAttachment{node: node, base: call{cid: cid, netns: pod.Path, ifname: "eth0", args: podArgs(cid)}}
		if r := a.main(t, "ADD", pod.Path); r.failed {
			t.Fatalf("reference bridge ADD: %s", r)
		}
		r := a.qoscni(t, "ADD", pod.Path, fmt.Sprintf("shape:%d", k), true)
		a.qoscni(t, "DEL", pod.Path, "", true)
		a.main(t, "DEL", pod.Path)
		if l := countLeaks(t, node); l.total() > 0 {
			t.Fatalf("chained probe for shape:%d left %s", k, l)
		}
		if !r.killed {
			if r.failed {
				t.Fatalf("chained probe ADD with shape:%d: %s", k, r)
			}
			shapes = k - 1
			break
		}
		if k > 20 {
			t.Fatal("more than 20 shaping actions in one chained ADD")
		}
	}
	var pts []point
	for i := 1; i <= shapes; i++ {
		pts = append(pts, point{op: "shape", step: fmt.Sprint(i)})
	}
	for _, s := range []string{"shaping", "ports", "controls", "state"} {
		pts = append(pts, point{op: "ADD-chained", step: s})
	}
	for _, s := range []string{"veth", "masq", "ports", "state"} {
		pts = append(pts, point{op: "DEL", step: s})
	}
	t.Logf("chained: %d shaping actions, %d kill points", shapes, len(pts))
	return pts
}

// chainedTrial: kill qoscni in the chain at pt; the runtime DELs the chain
// in reverse (qoscni, then bridge) with the cached result; with twice,
// again without netns and result. Then nothing may be left, and the chain
// ADDs and DELs the same attachment again.
func chainedTrial(t *testing.T, node *testnet.Node, pt point, twice bool, c *tally) {
	pod := newPodNS(t)
	cid := testnet.Unique("relc")
	a := &chainedAttachment{node: node, base: call{cid: cid, netns: pod.Path, ifname: "eth0", args: podArgs(cid)}}
	var failed []string
	fail := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		failed = append(failed, msg)
		t.Error(msg)
	}
	must := func(what string, r result) result {
		if r.failed {
			fail("%s: %s", what, r)
		}
		return r
	}
	must("bridge ADD", a.main(t, "ADD", pod.Path))
	if pt.op == "DEL" {
		must("qoscni ADD before the DEL kill", a.qoscni(t, "ADD", pod.Path, "", true))
		if r := a.qoscni(t, "DEL", pod.Path, pt.String(), true); !r.killed {
			fail("DEL with %s was not killed: %s", pt, r)
		}
	} else if r := a.qoscni(t, "ADD", pod.Path, pt.String(), true); !r.killed {
		fail("chained ADD with %s was not killed: %s", pt, r)
	}
	must("qoscni DEL", a.qoscni(t, "DEL", pod.Path, "", true))
	// Between the two DELs: are qoscni's qdiscs off the main plugin's veth?
	// The main plugins here delete the veth, so what stays on it is no
	// leak of the chain; it is reported as an observation.
	if ours := a.ourQdiscsOnMainVeth(t); len(ours) > 0 {
		t.Logf("OBSERVATION: after the kill at %s and qoscni's DEL (before the bridge's DEL), the main plugin's veth still has %v", pt, ours)
		c.observe(fmt.Sprintf("chained/%s: qoscni's DEL left %v on the main plugin's veth (removed with the veth by the bridge's DEL)", pt, ours))
	}
	must("bridge DEL", a.main(t, "DEL", pod.Path))
	if twice {
		must("second qoscni DEL (no netns, no prevResult)", a.qoscni(t, "DEL", "", "", false))
		must("second bridge DEL", a.main(t, "DEL", ""))
	}
	first := countLeaks(t, node)
	if first.total() > 0 {
		t.Errorf("after the kill at %s and the chain's DEL, left: %s", pt, first)
	}
	if r := must("next bridge ADD", a.main(t, "ADD", pod.Path)); !r.failed {
		must("next qoscni ADD", a.qoscni(t, "ADD", pod.Path, "", true))
	}
	must("qoscni DEL after the next ADD", a.qoscni(t, "DEL", pod.Path, "", true))
	must("bridge DEL after the next ADD", a.main(t, "DEL", pod.Path))
	second := countLeaks(t, node)
	if second.total() > 0 {
		t.Errorf("after the next ADD and DEL, left: %s", second)
	}
	c.finish(t, node, fmt.Sprintf("chained/%s:", pt), "next ADD+DEL", first, second, failed)
}

// ourQdiscsOnMainVeth lists qoscni's qdiscs (shaper root 1:, its leaf,
// clsact) on the main plugin's host veth, found in the cached result.
func (a *chainedAttachment) ourQdiscsOnMainVeth(t *testing.T) []string {
	t.Helper()
	var res struct {
		Interfaces []struct {
			Name    string `json:"name"`
			Sandbox string `json:"sandbox"`
		} `json:"interfaces"`
	}
	if err := json.Unmarshal(a.prev, &res); err != nil {
		t.Fatalf("bridge result: %v", err)
	}
	fd, err := unix.Open(a.node.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	h, err := netlink.NewHandleAt(vnetns.NsHandle(fd))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var out []string
	for _, ifc := range res.Interfaces {
		if ifc.Sandbox != "" || ifc.Name == refBridge {
			continue
		}
		l, err := h.LinkByName(ifc.Name)
		if err != nil {
			continue // gone with the pod
		}
		qs, err := h.QdiscList(l)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qs {
			switch q.Type() {
			case "tbf", "htb", "bfifo", "fq_codel", "clsact":
				out = append(out, fmt.Sprintf("main-veth %s:%s:%x:", ifc.Name, q.Type(), q.Attrs().Handle>>16))
			}
		}
	}
	return out
}
