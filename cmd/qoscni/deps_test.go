package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestPluginStaysLean: the plugin runs once per pod event, so what it
// links is part of every pod's start. It must not link client-go, the
// Prometheus client, or anything only the agent runs. A missing go tool is
// a failure, not a skip: the rule must hold wherever the tests run.
func TestPluginStaysLean(t *testing.T) {
	gotool := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(gotool, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps ./cmd/qoscni: %v\n%s", err, out)
	}
	forbidden := []string{
		"k8s.io/client-go",
		"github.com/prometheus/client_golang",
		"github.com/qoscni/qoscni/internal/agent",
		"github.com/qoscni/qoscni/metrics",
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list returned %d packages; the check would prove nothing:\n%s", len(deps), out)
	}
	for _, p := range deps {
		for _, f := range forbidden {
			if p == f || strings.HasPrefix(p, f+"/") {
				t.Errorf("the plugin depends on %s", p)
			}
		}
	}
}
