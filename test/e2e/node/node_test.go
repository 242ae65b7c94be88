package node_test

import (
	"os"
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
