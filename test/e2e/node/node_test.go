package node_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/test/e2e/node"
)

// The package tests itself with its own switch, which .ci/run's e2e
// targets set with the others.
func TestMain(m *testing.M) { node.Main(m, "QOSCNI_E2E_NODE") }

func TestNode(t *testing.T) {
	n := node.Get(t)
	// The test process is in the node's network namespace: the uplink is here.
	if out := n.NetNS.Exec(t, "ip", "-br", "addr", "show", "up0"); !strings.Contains(out, node.NodeIP) {
		t.Fatalf("up0 in the node namespace: %q", out)
	}
	if out, err := n.Client.Try("ping", "-c1", "-W2", node.NodeIP); err != nil {
		t.Fatalf("client -> node: %v %s", err, out)
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/opt/cni/bin", "/var/lib/kubelet", "/proc/sys/kernel/panic"} {
		if !strings.Contains(string(mi), " "+p+" ") {
			t.Errorf("%s is not covered in the node's mount namespace", p)
		}
	}
	// A write to a covered sysctl changes the copy only.
	if err := os.WriteFile("/proc/sys/kernel/panic", []byte("77"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestSecondNode: the second node is on the first node's segment, reached
// by the client too, and its programs see host paths of their own.
func TestSecondNode(t *testing.T) {
	first := node.Get(t)
	second := node.Second(t, node.NewSpawner(t))
	run := func(args ...string) (string, error) {
		out, err := exec.Command(second.Exec[0], append(second.Exec[1:], args...)...).CombinedOutput()
		return string(out), err
	}
	if out, err := run("ip", "-br", "addr", "show", "up0"); err != nil || !strings.Contains(out, node.Node2IP) {
		t.Fatalf("up0 on the second node: %q %v", out, err)
	}
	for _, ip := range []string{node.NodeIP, node.ClientIP} {
		if out, err := run("ping", "-c1", "-W2", ip); err != nil {
			t.Errorf("second node -> %s: %v %s", ip, err, out)
		}
	}
	if out, err := first.Client.Try("ping", "-c1", "-W2", node.Node2IP); err != nil {
		t.Errorf("client -> second node: %v %s", err, out)
	}
	// A file the first node's programs write is not the second node's.
	if err := os.WriteFile("/var/lib/kubelet/first-node", nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := run("test", "-e", "/var/lib/kubelet/first-node"); err == nil {
		t.Errorf("the second node sees the first node's /var/lib/kubelet: %s", out)
	}
	if out, err := run("sh", "-c", "echo x > /var/lib/kubelet/second-node"); err != nil {
		t.Fatalf("write on the second node: %v %s", err, out)
	}
	if _, err := os.Stat("/var/lib/kubelet/second-node"); err == nil {
		t.Error("the first node sees the second node's /var/lib/kubelet")
	}
	if out, err := run("test", "-e", "/run/netns/"+second.NetNS.Name); err != nil {
		t.Errorf("the second node's own netns file is missing in its /run/netns: %v %s", err, out)
	}
}
