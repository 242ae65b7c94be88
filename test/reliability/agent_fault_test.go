package reliability_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/e2e/cluster"
	"github.com/qoscni/qoscni/test/reliability/reltest"
)

// The agent's GC steps (internal/agent/reconcile/gc.go cleanup, internal/fault marks).
var agentGCSteps = []string{"links", "masq", "cleaners", "ipam", "state"}

const agentNode = "qrel-node"

// lockedBuffer collects a process's output while it runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// agentProc is one run of the tagged qoscni-agent.
type agentProc struct {
	cmd  *exec.Cmd
	log  *lockedBuffer
	done chan struct{}
	err  error
}

type agentOpts struct {
	fault      string
	confDir    string
	kubeconfig string // "" = no API access
}

// startAgent runs the agent for node. Without API access it runs inside
// the node netns (ip netns exec), as the DaemonSet's host-network pod does;
// with API access it runs in the test's namespace, where the API server
// listens on loopback, and reaches the node's devices with --netns.
func startAgent(t *testing.T, node *testnet.Node, o agentOpts) *agentProc {
	t.Helper()
	bin := taggedBinary(t, "qoscni-agent")
	args := []string{"serve", "--listen", "127.0.0.1:0", "--state-dir", node.StateDir,
		"--journal-dir", filepath.Join(node.Dir, "journal"), "--cni-conf-dir", o.confDir, "--state-registry", node.Registry,
		"--reconcile-interval", "200ms", "--log-level", "debug"}
	var cmd *exec.Cmd
	if o.kubeconfig == "" {
		cmd = exec.Command("ip", append([]string{"netns", "exec", node.Name, bin}, args...)...)
	} else {
		args = append(args, "--netns", node.Path, "--kubeconfig", o.kubeconfig, "--node-name", agentNode)
		cmd = exec.Command(bin, args...)
	}
	// No KUBECONFIG and no in-cluster variables: API access only when asked.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	if o.fault != "" {
		cmd.Env = append(cmd.Env, "QOSCNI_FAULT="+o.fault)
	}
	a := &agentProc{cmd: cmd, log: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = a.log, a.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	go func() { a.err = cmd.Wait(); close(a.done) }()
	t.Cleanup(func() {
		a.stop()
		if t.Failed() {
			t.Logf("agent (fault %q) log:\n%s", o.fault, tail(a.log.String(), 40))
		}
	})
	return a
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (a *agentProc) exited() bool {
	select {
	case <-a.done:
		return true
	default:
		return false
	}
}

// killed reports whether the agent died by SIGKILL (its fault point).
func (a *agentProc) killed() bool {
	if !a.exited() {
		return false
	}
	var ee *exec.ExitError
	if errors.As(a.err, &ee) {
		ws, ok := ee.Sys().(syscall.WaitStatus)
		return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
	}
	return false
}

// stop ends the agent with SIGTERM (SIGKILL after 10 s).
func (a *agentProc) stop() {
	if a.exited() {
		return
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
}

// waitFor polls cond every 50 ms until it holds, the agent exits, or the
// timeout passes; it reports whether cond held.
func waitFor(a *agentProc, timeout time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return true
		}
		if a != nil && a.exited() {
			return cond()
		}
	}
	return cond()
}

// settle gives an agent whose work is visibly done a moment to reach a
// fault point right behind it (the record write is the last step of a
// reshape), so "not reached" is not a race with the kill.
func settle(a *agentProc) {
	if !a.exited() {
		waitFor(a, time.Second, a.exited)
	}
}

// writeConfDir puts the network's config where the agent looks for the
// IPAM of the attachments it removes.
func writeConfDir(t *testing.T, node *testnet.Node) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "10-"+network+".conf"), reltest.Marshal(standaloneNet.BaseConf(node)), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// podShaping describes the attachment's tc pipeline: the qdiscs of its
// veth and IFB with their rates, and the redirect filters on the veth.
func podShaping(t *testing.T, node *testnet.Node, veth, ifb string) []string {
	t.Helper()
	fd, err := unix.Open(node.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
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
	names := map[int]string{}
	for _, name := range []string{veth, ifb} {
		l, err := h.LinkByName(name)
		if err != nil {
			out = append(out, name+": missing")
			continue
		}
		names[l.Attrs().Index] = name
		qs, err := h.QdiscList(l)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qs {
			a := q.Attrs()
			s := fmt.Sprintf("%s qdisc %s %x: parent %x", name, q.Type(), a.Handle>>16, a.Parent)
			if tbf, ok := q.(*netlink.Tbf); ok {
				s += fmt.Sprintf(" rate %d", tbf.Rate*8)
			}
			out = append(out, s)
		}
	}
	if l, err := h.LinkByName(veth); err == nil {
		fs, err := h.FilterList(l, netlink.HANDLE_MIN_INGRESS)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fs {
			s := fmt.Sprintf("%s filter %s", veth, f.Type())
			if u, ok := f.(*netlink.U32); ok {
				for _, act := range u.Actions {
					if m, ok := act.(*netlink.MirredAction); ok {
						s += fmt.Sprintf(" mirred %d to %s", m.MirredAction, names[m.Ifindex])
					}
				}
			}
			out = append(out, s)
		}
	}
	sort.Strings(out)
	return out
}

// wantPipeline is podShaping's view of an attachment shaped both ways
// (leaf queues left out).
func wantPipeline(veth, ifb string, ingressBits, egressBits int) []string {
	out := []string{
		fmt.Sprintf("%s qdisc tbf 1: parent ffffffff rate %d", veth, ingressBits),
		fmt.Sprintf("%s qdisc clsact ffff: parent fffffff1", veth),
		fmt.Sprintf("%s filter u32 mirred 1 to %s", veth, ifb),
		fmt.Sprintf("%s qdisc tbf 1: parent ffffffff rate %d", ifb, egressBits),
	}
	sort.Strings(out)
	return out
}

func record(t *testing.T, node *testnet.Node, cid string) *state.Record {
	t.Helper()
	rec, err := state.New(node.StateDir).Load(state.Key{Network: network, ContainerID: cid, IfName: "eth0"})
	if err != nil || rec == nil {
		t.Fatalf("state record of %s: %v %v", cid, rec, err)
	}
	return rec
}

// TestAgentFault kills the agent during drift repair, GC and live
// reshaping, restarts it without the fault and checks that the work
// completes with nothing left over.
func TestAgentFault(t *testing.T) {
	t.Parallel()
	testnet.RequireRoot(t)
	taggedBinary(t, "qoscni")
	taggedBinary(t, "qoscni-agent")
	var wg sync.WaitGroup
	for name, body := range map[string]func(*testing.T){"repair": agentRepair, "gc": agentGC, "reshape": agentReshape} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.Run(name, body)
		}()
	}
	wg.Wait()
}

// agentRepair: the pod's qdiscs are deleted by hand; the agent dies at the
// k-th shaping action of the repair, for every k the repair makes; the
// restarted agent finishes it.
func agentRepair(t *testing.T) {
	node := testnet.NewNode(t)
	confDir := writeConfDir(t, node)
	killedTrials := 0
	for k := 1; k <= 12; k++ {
		pt := fmt.Sprintf("shape:%d", k)
		reached := true
		t.Run(pt, func(t *testing.T) {
			pod := newPodNS(t)
			cid := testnet.Unique("ag")
			add := call{cmd: "ADD", cid: cid, netns: pod.Path, ifname: "eth0", args: podArgs(cid), conf: addConf(node, profFull)}
			if r := invoke(t, node, add); r.failed {
				t.Fatalf("ADD: %s", r)
			}
			rec := record(t, node, cid)
			veth, ifb := rec.HostVeth, rec.Shaping.IFB
			want := podShaping(t, node, veth, ifb)
			baseline := countLeaks(t, node)
			// Drift: all of the attachment's shaping is gone.
			node.Exec(t, "tc", "qdisc", "del", "dev", veth, "root")
			node.Exec(t, "tc", "qdisc", "del", "dev", veth, "clsact")
			node.Exec(t, "tc", "qdisc", "del", "dev", ifb, "root")

			repaired := func() bool { return strings.Join(podShaping(t, node, veth, ifb), "\n") == strings.Join(want, "\n") }
			a := startAgent(t, node, agentOpts{fault: pt, confDir: confDir})
			waitFor(a, 20*time.Second, func() bool { return a.exited() || repaired() })
			settle(a)
			switch {
			case a.killed():
				killedTrials++
				b := startAgent(t, node, agentOpts{confDir: confDir})
				if !waitFor(b, 20*time.Second, repaired) {
					t.Errorf("restarted agent did not finish the repair killed at %s:\nhave %q\nwant %q", pt, podShaping(t, node, veth, ifb), want)
				}
				b.stop()
			case a.exited():
				t.Fatalf("agent exited without the fault: %v", a.err)
			case repaired():
				// The repair has fewer than k actions: this run proved
				// the agent repairs in one go; no more points.
				reached = false
				t.Logf("%s not reached: the repair makes %d shaping actions", pt, k-1)
				a.stop()
			default:
				t.Fatalf("agent neither died at %s nor repaired within 20 s", pt)
			}
			if got := countLeaks(t, node); got.String() != baseline.String() {
				t.Errorf("after the repair the node holds %s, after ADD it held %s", got, baseline)
			}
			if r := invoke(t, node, call{cmd: "DEL", cid: cid, netns: pod.Path, ifname: "eth0", conf: plainConf(node)}); r.failed {
				t.Errorf("DEL: %s", r)
			}
			if l := countLeaks(t, node); l.total() > 0 {
				t.Errorf("after DEL, left: %s", l)
				scrub(t, node)
			}
		})
		if !reached {
			break
		}
	}
	if killedTrials == 0 {
		t.Error("the agent was never killed during a repair")
	}
	t.Logf("SUMMARY agent repair: %d kill points (shape:1..%d)", killedTrials, killedTrials)
}

// agentGC: the pod netns is deleted; the agent dies at each step of its
// GC of the attachment; the restarted agent finishes the GC; the pod can
// be added again.
func agentGC(t *testing.T) {
	node := testnet.NewNode(t)
	confDir := writeConfDir(t, node)
	leaky := 0
	for _, step := range agentGCSteps {
		pt := "gc:" + step
		t.Run(pt, func(t *testing.T) {
			pod := newPodNS(t)
			cid := testnet.Unique("ag")
			add := call{cmd: "ADD", cid: cid, netns: pod.Path, ifname: "eth0", args: podArgs(cid), conf: addConf(node, profFull)}
			if r := invoke(t, node, add); r.failed {
				t.Fatalf("ADD: %s", r)
			}
			a := startAgent(t, node, agentOpts{fault: pt, confDir: confDir})
			deletePodNS(t, pod)
			if !waitFor(a, 20*time.Second, a.exited) || !a.killed() {
				t.Fatalf("agent was not killed at %s within 20 s (exited %v: %v)", pt, a.exited(), a.err)
			}
			b := startAgent(t, node, agentOpts{confDir: confDir})
			var l leaks
			if !waitFor(b, 10*time.Second, func() bool { l = countLeaks(t, node); return l.total() == 0 }) {
				leaky++
				t.Errorf("after GC killed at %s and the agent restarted (10 s), left: %s", pt, l)
			}
			b.stop()
			// The next ADD of the same attachment.
			pod2 := newPodNS(t)
			add.netns = pod2.Path
			if r := invoke(t, node, add); r.failed {
				t.Errorf("next ADD of the same attachment: %s", r)
			}
			del := add
			del.cmd = "DEL"
			if r := invoke(t, node, del); r.failed {
				t.Errorf("DEL after the next ADD: %s", r)
			}
			if l := countLeaks(t, node); l.total() > 0 {
				t.Errorf("after the next ADD and DEL, left: %s", l)
				scrub(t, node)
			}
		})
	}
	t.Logf("SUMMARY agent gc: %d kill points, %d with leaks", len(agentGCSteps), leaky)
}

// agentReshape: a pod's bandwidth annotations change; the agent dies at
// each shaping action of the reshape and at the two reshape points (kernel
// changed / record written); the restarted agent ends at the new rates.
func agentReshape(t *testing.T) {
	cp := cluster.StartControlPlane(t) // skips when the binaries are not built
	ctx := context.Background()
	if _, err := cp.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: agentNode}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	node := testnet.NewNode(t)
	confDir := writeConfDir(t, node)
	oldAnn := map[string]string{"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "20M"}
	newAnn := map[string]string{"kubernetes.io/ingress-bandwidth": "30M", "kubernetes.io/egress-bandwidth": "40M"}
	pods := cp.Client.CoreV1().Pods("default")
	var mu sync.Mutex
	var reverted []string

	// trial returns false when the point was not reached (the reshape
	// completed with the fault armed).
	trial := func(t *testing.T, pt string) bool {
		name := testnet.Unique("web")
		p, err := pods.Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: oldAnn},
			Spec:       corev1.PodSpec{NodeName: agentNode, Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}) })
		pod := newPodNS(t)
		cid := "c" + name
		c := standaloneNet.BaseConf(node)
		c["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": oldAnn}
		add := call{cmd: "ADD", cid: cid, netns: pod.Path, ifname: "eth0", conf: reltest.Marshal(c),
			args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + name + ";K8S_POD_UID=" + string(p.UID)}
		if r := invoke(t, node, add); r.failed {
			t.Fatalf("ADD: %s", r)
		}
		rec := record(t, node, cid)
		veth, ifb := rec.HostVeth, rec.Shaping.IFB
		baseline := countLeaks(t, node)
		reshaped := func() bool {
			s := strings.Join(podShaping(t, node, veth, ifb), "\n")
			r := record(t, node, cid)
			return strings.Contains(s, veth+" qdisc tbf 1: parent ffffffff rate 30000000") &&
				strings.Contains(s, ifb+" qdisc tbf 1: parent ffffffff rate 40000000") &&
				r.Shaping != nil && r.Shaping.Ingress != nil && r.Shaping.Egress != nil &&
				r.Shaping.Ingress.RateBits == 30_000_000 && r.Shaping.Egress.RateBits == 40_000_000
		}

		if have, want := strings.Join(podShaping(t, node, veth, ifb), "\n"), strings.Join(wantPipeline(veth, ifb, 10_000_000, 20_000_000), "\n"); have != want {
			t.Fatalf("tc pipeline after ADD:\n%s\nwant:\n%s", have, want)
		}

		a := startAgent(t, node, agentOpts{fault: pt, confDir: confDir, kubeconfig: cp.Kubeconfig})
		p.Annotations = newAnn
		if _, err := pods.Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(a, 30*time.Second, func() bool { return a.exited() || reshaped() })
		settle(a)
		reached := true
		switch {
		case a.killed():
			b := startAgent(t, node, agentOpts{confDir: confDir, kubeconfig: cp.Kubeconfig})
			if !waitFor(b, 30*time.Second, reshaped) {
				t.Errorf("restarted agent did not finish the reshape killed at %s: %q, record %+v", pt, podShaping(t, node, veth, ifb), record(t, node, cid).Shaping)
			}
			b.stop()
			// Observation for the report: the restarted agent's first pass
			// may run before its pod informer synced and then "repairs" the
			// kernel back to the record, which the kill left at the old
			// rates, before it reshapes again.
			if strings.Contains(b.log.String(), "repaired shaping that drifted from the record") {
				mu.Lock()
				reverted = append(reverted, pt)
				mu.Unlock()
				t.Logf("restarted agent first reverted to the record's old rates, then reshaped")
			}
		case a.exited():
			t.Fatalf("agent exited without the fault: %v", a.err)
		case reshaped():
			reached = false
			a.stop()
		default:
			t.Fatalf("agent neither died at %s nor reshaped within 30 s", pt)
		}
		// Links, nftables elements, reservations and records as after
		// ADD; the tc pipeline is the one shape at the new rates. A queue
		// grafted under the shaper (parent 1:1: a smaller burst starts on
		// a fresh queue, shaping/tc.go) replaces TBF's built-in one and is
		// part of the pipeline, not a leftover.
		got := countLeaks(t, node)
		got.qdiscs, baseline.qdiscs = nil, nil
		if got.String() != baseline.String() {
			t.Errorf("after the reshape the node holds %s, after ADD it held %s", got, baseline)
		}
		var pipeline, leaves []string
		for _, l := range podShaping(t, node, veth, ifb) {
			if strings.HasSuffix(l, " parent 10001") {
				leaves = append(leaves, l)
				continue
			}
			pipeline = append(pipeline, l)
		}
		if have, want := strings.Join(pipeline, "\n"), strings.Join(wantPipeline(veth, ifb, 30_000_000, 40_000_000), "\n"); have != want {
			t.Errorf("tc pipeline after the reshape:\n%s\nwant:\n%s", have, want)
		}
		if len(leaves) > 2 {
			t.Errorf("more than one queue per shaper: %q", leaves)
		}
		if len(leaves) > 0 {
			t.Logf("queues grafted under the shapers: %q", leaves)
		}
		del := add
		del.cmd = "DEL"
		if r := invoke(t, node, del); r.failed {
			t.Errorf("DEL: %s", r)
		}
		if l := countLeaks(t, node); l.total() > 0 {
			t.Errorf("after DEL, left: %s", l)
			scrub(t, node)
		}
		return reached
	}

	killed := 0
	defer func() {
		if len(reverted) > 0 {
			t.Logf("OBSERVATION: after a kill at %v the restarted agent reverted the kernel to the stale record's rates before reshaping", reverted)
		}
	}()
	for k := 1; k <= 12; k++ {
		pt := fmt.Sprintf("shape:%d", k)
		reached := true
		t.Run(pt, func(t *testing.T) {
			if reached = trial(t, pt); reached {
				killed++
			} else {
				t.Logf("%s not reached: the reshape makes %d shaping actions", pt, k-1)
			}
		})
		if !reached {
			break
		}
	}
	if killed == 0 {
		t.Error("the agent was never killed during a reshape's shaping")
	}
	for _, step := range []string{"applied", "state"} {
		pt := "reshape:" + step
		t.Run(pt, func(t *testing.T) {
			if trial(t, pt) {
				killed++
			} else {
				t.Errorf("%s was not reached", pt)
			}
		})
	}
	t.Logf("SUMMARY agent reshape: %d kill points", killed)
}
