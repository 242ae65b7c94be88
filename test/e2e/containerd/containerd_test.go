package containerd

import (
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/test/e2e/images"
	"github.com/qoscni/qoscni/test/e2e/node"
)

func TestMain(m *testing.M) { node.Main(m, "QOSCNI_E2E_CRI") }

// TestLifecycle runs a host-network pod (no CNI involved) through Start,
// Restart and the cleanup, then checks that the cleanup left nothing: no
// containerd, shim or container process, mount or cgroup.
func TestLifecycle(t *testing.T) {
	node.Get(t)
	var c *Containerd
	var containerdPID int
	t.Run("run", func(t *testing.T) {
		c = Start(t, Options{CNIBinDir: t.TempDir(), CNIConfDir: t.TempDir()})
		containerdPID = c.pid()
		if v := c.Crictl(t, "version"); !strings.Contains(v, "containerd") {
			t.Fatalf("crictl version: %s", v)
		}
		dir := t.TempDir()
		podCfg := filepath.Join(dir, "pod.json")
		ctrCfg := filepath.Join(dir, "ctr.json")
		writeJSON(t, podCfg, map[string]any{
			"metadata":      map[string]any{"name": "hostnet", "namespace": "e2e", "uid": "hostnet-uid"},
			"log_directory": dir,
			"linux": map[string]any{
				"cgroup_parent": c.CgroupParent,
				// network: NODE (2): no CNI.
				"security_context": map[string]any{"namespace_options": map[string]any{"network": 2, "pid": 1}},
			},
		})
		writeJSON(t, ctrCfg, map[string]any{
			"metadata": map[string]any{"name": "workload"},
			"image":    map[string]any{"image": images.Workload},
			"log_path": "workload.log",
		})
		began := time.Now()
		pod := strings.TrimSpace(c.Crictl(t, "runp", podCfg))
		ctr := strings.TrimSpace(c.Crictl(t, "create", "--no-pull", pod, ctrCfg, podCfg))
		c.Crictl(t, "start", ctr)
		addr := net.JoinHostPort("127.0.0.1", "8080")
		answer(t, addr)
		t.Logf("host-network pod answering in %v", time.Since(began).Round(time.Millisecond))
		if n := len(shimPIDs(c.Address)); n == 0 {
			t.Fatal("no containerd-shim-runc-v2 found for this containerd")
		}

		c.Restart(t)
		if pid := c.pid(); pid == containerdPID {
			t.Fatalf("containerd pid %d unchanged by Restart", pid)
		}
		var st struct {
			Status struct {
				State string `json:"state"`
			} `json:"status"`
		}
		if err := json.Unmarshal([]byte(c.Crictl(t, "inspectp", pod)), &st); err != nil || st.Status.State != "SANDBOX_READY" {
			t.Fatalf("pod after restart: %v %q", err, st.Status.State)
		}
		if err := json.Unmarshal([]byte(c.Crictl(t, "inspect", ctr)), &st); err != nil || st.Status.State != "CONTAINER_RUNNING" {
			t.Fatalf("container after restart: %v %q", err, st.Status.State)
		}
		answer(t, addr)
		// The pod is left running: the cleanup must remove it.
	})
	if c == nil {
		return
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(containerdPID))); err == nil {
		t.Errorf("containerd (pid %d) still running after cleanup", containerdPID)
	}
	if pids := shimPIDs(c.Address); len(pids) > 0 {
		t.Errorf("shims left after cleanup: %v", pids)
	}
	if dirs := cgroupDirs(c.CgroupParent); len(dirs) > 0 {
		t.Errorf("cgroups left after cleanup: %v", dirs)
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), c.Dir) {
		t.Errorf("mounts left under %s:\n%s", c.Dir, mounts)
	}
	if _, err := os.Stat(c.Dir); err == nil {
		t.Errorf("%s not removed", c.Dir)
	}
	if conn, err := net.DialTimeout("tcp", "127.0.0.1:8080", time.Second); err == nil {
		conn.Close()
		t.Error("the workload still answers after cleanup")
	}
}

func answer(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
			b, rerr := io.ReadAll(conn)
			conn.Close()
			if rerr == nil && len(strings.Fields(string(b))) == 2 {
				return
			}
			err = rerr
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload at %s does not answer: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
