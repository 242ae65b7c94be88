// Package cri_test runs qoscni under containerd's CRI plugin, as a kubelet
// would have it run, without Kubernetes: crictl creates the pods, their
// annotations and hostPorts reach the plugin as containerd sends them,
// and the tests measure the shaping, reach the hostPorts, restart
// containerd under a live pod, drive CHECK, STATUS and GC through libcni,
// and check that removing a pod leaves nothing behind. Every test runs
// once per containerd (containerd.Versions: Debian's 1.6 and 2.x), as a
// subtest named after it (TestStandalone/containerd2/shaping).
//
//	QOSCNI_E2E_CRI=1 go test ./test/e2e/cri   (as root; make e2e-cri)
package cri_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/e2e/containerd"
	"github.com/qoscni/qoscni/test/e2e/images"
	"github.com/qoscni/qoscni/test/e2e/node"
)

func TestMain(m *testing.M) { node.Main(m, "QOSCNI_E2E_CRI") }

const (
	ingressRate  = 10e6 // kubernetes.io/ingress-bandwidth: 10M
	egressRate   = 20e6 // kubernetes.io/egress-bandwidth: 20M
	hostTCP      = 30080
	hostUDP      = 30081
	transferSecs = 6
	// unshapedMin is what an unannotated pod must exceed: 10x the
	// shaped rate.
	unshapedMin = 100e6
)

func shapedPod(name string) podSpec {
	return podSpec{
		name: name,
		annotations: map[string]string{
			"kubernetes.io/ingress-bandwidth": "10M",
			"kubernetes.io/egress-bandwidth":  "20M",
		},
		ports: []portMapping{
			{proto: "tcp", container: images.WorkloadTCPPort, host: hostTCP},
			{proto: "udp", container: images.WorkloadUDPPort, host: hostUDP},
		},
	}
}

// checkShaping measures both directions of a shaped pod. Ingress is
// traffic into the pod (the node sends), egress the pod sending.
func (e *env) checkShaping(t *testing.T, p *pod) {
	t.Helper()
	srv := startIperf3(t, p.netns)
	defer srv.stop()
	measureShaped(t, "ingress (node -> pod)", p.ip, false, ingressRate)
	measureShaped(t, "egress (pod -> node)", p.ip, true, egressRate)
}

// TestStandalone: qoscni alone in the conflist wires, shapes and maps the
// ports of a pod, leaves an unannotated pod unshaped, and removes
// everything on stopp+rmp.
func TestStandalone(t *testing.T) { eachContainerd(t, testStandalone) }

func testStandalone(t *testing.T, v int) {
	began := time.Now()
	e := newEnv(t, v, standalone, 1)
	p := e.runPod(t, shapedPod("shaped"))
	a := e.attachmentOf(t, p, true, hostTCP, hostUDP)
	t.Run("shaping", func(t *testing.T) { e.checkShaping(t, p) })
	t.Run("hostPorts", func(t *testing.T) { e.checkHostPorts(t, p, hostTCP, hostUDP) })
	t.Run("unannotated", func(t *testing.T) {
		q := e.runPod(t, podSpec{name: "plain"})
		qa := e.attachmentOf(t, q, false)
		srv := startIperf3(t, q.netns)
		in := measure(t, q.ip, 3, false)
		out := measure(t, q.ip, 3, true)
		srv.stop()
		t.Logf("unshaped ingress: %s", in)
		t.Logf("unshaped egress: %s", out)
		for _, r := range []struct {
			dir string
			run iperfRun
		}{{"ingress", in}, {"egress", out}} {
			if r.run.Total < unshapedMin {
				t.Errorf("unannotated pod %s: %s, want at least %s", r.dir, mbit(r.run.Total), mbit(unshapedMin))
			}
		}
		e.removePod(t, q)
		qa.assertGone(t, "after crictl stopp+rmp")
	})
	t.Run("removal", func(t *testing.T) {
		e.removePod(t, p)
		a.assertGone(t, "after crictl stopp+rmp")
	})
	t.Logf("TestStandalone body on %s took %v", containerd.Name(v), time.Since(began).Round(time.Millisecond))
}

// TestChained: Debian's bridge (host-local IPAM) wires the pod, qoscni
// after it shapes and maps ports in place of bandwidth and portmap.
func TestChained(t *testing.T) { eachContainerd(t, testChained) }

func testChained(t *testing.T, v int) {
	began := time.Now()
	e := newEnv(t, v, chained, 2)
	p := e.runPod(t, shapedPod("chained"))
	a := e.attachmentOf(t, p, true, hostTCP, hostUDP)
	if a.record.Bridge != "" && a.record.Bridge != e.bridge {
		t.Errorf("chained record names bridge %q, the bridge plugin's is %q", a.record.Bridge, e.bridge)
	}
	t.Run("shaping", func(t *testing.T) { e.checkShaping(t, p) })
	t.Run("hostPorts", func(t *testing.T) { e.checkHostPorts(t, p, hostTCP, hostUDP) })
	t.Run("removal", func(t *testing.T) {
		e.removePod(t, p)
		a.assertGone(t, "after crictl stopp+rmp")
	})
	t.Logf("TestChained body on %s took %v", containerd.Name(v), time.Since(began).Round(time.Millisecond))
}

// TestRestart: containerd restarts under a shaped, port-mapped pod; the
// pod's qdiscs, hostPort and record are untouched (no second ADD), and
// its removal afterwards is complete.
func TestRestart(t *testing.T) { eachContainerd(t, testRestart) }

func testRestart(t *testing.T, v int) {
	began := time.Now()
	e := newEnv(t, v, standalone, 3)
	p := e.runPod(t, shapedPod("restarted"))
	a := e.attachmentOf(t, p, true, hostTCP, hostUDP)
	qdiscsBefore := qdiscsJSON(t, a.hostVeth) + qdiscsJSON(t, a.ifb)
	ipBefore, ip6Before := p.ip, p.ip6

	e.ctrd.Restart(t)

	if after := qdiscsJSON(t, a.hostVeth) + qdiscsJSON(t, a.ifb); after != qdiscsBefore {
		t.Errorf("qdiscs changed across the containerd restart:\nbefore %s\nafter  %s", qdiscsBefore, after)
	}
	e.inspectPod(t, p) // fails unless SANDBOX_READY
	if p.ip != ipBefore || p.ip6 != ip6Before {
		t.Errorf("pod addresses changed across the restart: %s %s -> %s %s", ipBefore, ip6Before, p.ip, p.ip6)
	}
	var ctr struct {
		Status struct {
			State string `json:"state"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(e.ctrd.Crictl(t, "inspect", "-o", "json", p.container)), &ctr); err != nil || ctr.Status.State != "CONTAINER_RUNNING" {
		t.Errorf("workload after the restart: %v %q", err, ctr.Status.State)
	}
	rec, err := state.New(e.stateDir).Load(state.Key{Network: e.network, ContainerID: p.id, IfName: podIfName})
	if err != nil || rec == nil || !rec.Created.Equal(a.record.Created) {
		t.Errorf("state record after the restart: %v %v (created before: %v)", rec, err, a.record.Created)
	}
	line := retry(t, 5*time.Second, "the pod after the restart", func() (string, error) {
		return tcpLine(e.node.NetNS.Path, "tcp4", hostPort(p.ip, images.WorkloadTCPPort))
	})
	hp := retry(t, 5*time.Second, "the hostPort after the restart", func() (string, error) {
		return tcpLine(e.node.Client.Path, "tcp4", hostPort(e.node.IP, hostTCP))
	})
	if !strings.HasPrefix(line, p.name+" ") || !strings.HasPrefix(hp, p.name+" ") {
		t.Errorf("after the restart: pod answered %q, hostPort %q", line, hp)
	}
	t.Logf("after the restart: qdiscs unchanged, pod %q, hostPort %q", line, hp)
	e.removePod(t, p)
	a.assertGone(t, "after crictl stopp+rmp")
	t.Logf("TestRestart body on %s took %v", containerd.Name(v), time.Since(began).Round(time.Millisecond))
}

// TestCNIToolCheckStatusGC drives the CNI verbs containerd never calls
// through libcni (qoscni-cnitool) on a pod containerd attached: CHECK with
// the arguments containerd passed, CHECK after a qdisc was deleted by
// hand, STATUS, and GC with no valid attachment; then the pod's removal
// through the CRI must still succeed (DEL after GC).
func TestCNIToolCheckStatusGC(t *testing.T) { eachContainerd(t, testCNIToolCheckStatusGC) }

func testCNIToolCheckStatusGC(t *testing.T, v int) {
	began := time.Now()
	e := newEnv(t, v, standalone, 4)
	p := e.runPod(t, shapedPod("checked"))
	a := e.attachmentOf(t, p, true, hostTCP, hostUDP)

	tool := cnitool(t)
	c := e.cachedArgs(t, p)
	capArgs, err := json.Marshal(c.CapabilityArgs)
	if err != nil {
		t.Fatal(err)
	}
	var kv []string
	for _, pair := range c.CniArgs {
		kv = append(kv, pair[0]+"="+pair[1])
	}
	t.Logf("containerd passed CNI_ARGS %q and capability args %s", strings.Join(kv, ";"), capArgs)
	check := []string{"check", "--conflist", e.conflist, "--cni-path", e.binDir, "--cache-dir", cniCacheDir,
		"--netns", p.netnsPath, "--id", p.id, "--ifname", podIfName, "--args", strings.Join(kv, ";"), "--cap-args", string(capArgs)}

	t0 := time.Now()
	if out, err := e.runCnitool(t, tool, check...); err != nil {
		t.Fatalf("CHECK of a healthy attachment failed: %v\n%s", err, out)
	}
	t.Logf("CHECK passed in %v", time.Since(t0).Round(time.Millisecond))

	// The pod's ingress shaper: the root qdisc of its host veth.
	testnet.Run(t, "tc", "qdisc", "del", "dev", a.hostVeth, "root")
	out, err := e.runCnitool(t, tool, check...)
	if err == nil {
		t.Errorf("CHECK passed after the ingress qdisc on %s was deleted:\n%s", a.hostVeth, out)
	} else if !strings.Contains(out, a.hostVeth) {
		t.Errorf("CHECK failed without naming %s: %v\n%s", a.hostVeth, err, out)
	} else {
		t.Logf("CHECK after deleting the ingress qdisc: %s", strings.TrimSpace(out))
	}

	// STATUS and GC are CNI 1.1.0 verbs: libcni skips them for the 1.0.0
	// conflist containerd 1.6 needs, so they get the same list at 1.1.0.
	conf11 := fmt.Sprintf("%s/cnitool-%s.conflist", e.dir, e.network)
	writeJSON(t, conf11, e.netConfList("1.1.0"))
	t0 = time.Now()
	if out, err := e.runCnitool(t, tool, "status", "--conflist", conf11, "--cni-path", e.binDir); err != nil || !strings.Contains(out, "ready") {
		t.Errorf("STATUS: %v\n%s", err, out)
	} else {
		t.Logf("STATUS in %v: %s", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(out))
	}
	// An empty result cache: libcni would otherwise DEL the cached
	// attachment itself, and the plugin's GC would find nothing to do.
	t0 = time.Now()
	if out, err := e.runCnitool(t, tool, "gc", "--conflist", conf11, "--cni-path", e.binDir, "--cache-dir", t.TempDir()); err != nil {
		t.Fatalf("GC: %v\n%s", err, out)
	}
	t.Logf("GC with no valid attachment in %v", time.Since(t0).Round(time.Millisecond))
	// containerd's cache entry is the runtime's, not the plugin's.
	a.assertGoneExceptCache(t, "after GC")

	e.removePod(t, p)
	a.assertGone(t, "after GC, then crictl stopp+rmp")
	t.Logf("TestCNIToolCheckStatusGC body on %s took %v", containerd.Name(v), time.Since(began).Round(time.Millisecond))
}
