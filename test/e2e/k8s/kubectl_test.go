package k8s_test

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// kubectlPluginStep: `kubectl qoscni` (cmd/kubectl-qoscni), built here
// and run as kubectl runs a plugin, reads both nodes' agents through the
// API server: status lists the shaped pods in the kernel, top ranks the
// pod under a transfer first, explain shows what the pod asked for, what
// it got, the Events and what its agent reads from the kernel (devices).
func (e *env) kubectlPluginStep(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "kubectl-qoscni")
	// The flags of the agent's build in qoscniImage, whose packages this
	// shares, so most of it comes from the build cache.
	run(t, e.repo, []string{"CGO_ENABLED=0"}, "go", "build", "-tags", "grpcnotrace", "-trimpath", "-o", bin, "./cmd/kubectl-qoscni")
	plugin := func(args ...string) string {
		t.Helper()
		return run(t, e.repo, nil, bin, append([]string{"--kubeconfig", e.cp.Kubeconfig}, args...)...)
	}
	pod := "default/" + shaped.Name
	status := plugin("status")
	t.Logf("kubectl qoscni status:\n%s", status)
	rows := 0
	for _, l := range strings.Split(status, "\n") {
		if f := strings.Fields(l); len(f) == 10 && f[1] == pod {
			rows++
			if f[9] != "yes" {
				t.Errorf("status: %s not in the kernel: %s", pod, l)
			}
		}
	}
	if rows != 2 {
		t.Errorf("status: %d rows for %s, want ingress and egress", rows, pod)
	}
	if !strings.Contains(status, node2Name) {
		t.Errorf("status has nothing from %s", node2Name)
	}

	// A transfer into the shaped pod while top watches.
	transfer := exec.Command("ip", "netns", "exec", e.n.NetNS.Name, "iperf3", "-c", podIPv4(t, shapedRec), "-t", "6")
	if err := transfer.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = transfer.Process.Kill(); _ = transfer.Wait() })
	time.Sleep(time.Second)
	top := plugin("top", "--window", "2s", "--limit", "3")
	t.Logf("kubectl qoscni top:\n%s", top)
	lines := strings.Split(strings.TrimSpace(top), "\n")
	if len(lines) < 2 || !strings.Contains(lines[1], pod) || !strings.Contains(lines[1], "ingress") {
		t.Errorf("top: the pod under the transfer is not first:\n%s", top)
	}
	_ = transfer.Wait()

	explain := plugin("explain", shaped.Name, "-n", "default", "--window", "1s")
	t.Logf("kubectl qoscni explain:\n%s", explain)
	for _, want := range []string{"kubernetes.io/ingress-bandwidth", "Got (qoscni.io/effective-shaping)", `"inKernel": true`, "ShapingApplied",
		"On the node (its agent read the kernel over 1s)", shapedRec.HostVeth} {
		if !strings.Contains(explain, want) {
			t.Errorf("explain lacks %q", want)
		}
	}
}
