package containerd

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/qoscni/qoscni/test/e2e/images"
	"github.com/qoscni/qoscni/test/e2e/node"
)

func TestMain(m *testing.M) { node.Main(m, "QOSCNI_E2E_CRI") }

// TestLifecycle runs a host-network pod (no CNI involved) through Start,
// Restart and the cleanup, then checks that the cleanup left nothing: no
// containerd, shim or container process, mount or cgroup; on each
// containerd version.
func TestLifecycle(t *testing.T) {
	node.Get(t)
	for _, v := range Versions {
		t.Run(Name(v), func(t *testing.T) { lifecycle(t, v) })
	}
}

// runtimeVersions are the major versions containerd's CRI reports for
// Options.Version ("crictl version"'s RuntimeVersion: "1.6.20~ds1",
// "v2.4.2").
var runtimeVersions = map[int]*regexp.Regexp{
	1: regexp.MustCompile(`(?m)^RuntimeVersion:\s+v?1\.6\.`),
	2: regexp.MustCompile(`(?m)^RuntimeVersion:\s+v?2\.`),
}

func lifecycle(t *testing.T, version int) {
	var c *Containerd
	var containerdPID int
	t.Run("run", func(t *testing.T) {
		c = Start(t, Options{Version: version, CNIBinDir: t.TempDir(), CNIConfDir: t.TempDir()})
		containerdPID = c.pid()
		v := c.Crictl(t, "version")
		if !strings.Contains(v, "RuntimeName:  containerd") || !runtimeVersions[version].MatchString(v) {
			t.Fatalf("crictl version of %s: %s", Name(version), v)
		}
		t.Logf("crictl version: %s", strings.Join(strings.Fields(v), " "))
		addr := net.JoinHostPort("127.0.0.1", "8080")
		pod, ctr := runHostWorkload(t, c, addr)
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

// runHostWorkload runs the workload in a host-network pod (no CNI
// involved) and waits until it answers at addr; it returns the sandbox
// and container IDs.
func runHostWorkload(t *testing.T, c *Containerd, addr string) (pod, ctr string) {
	t.Helper()
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
	pod = strings.TrimSpace(c.Crictl(t, "runp", podCfg))
	ctr = strings.TrimSpace(c.Crictl(t, "create", "--no-pull", pod, ctrCfg, podCfg))
	c.Crictl(t, "start", ctr)
	answer(t, addr)
	t.Logf("host-network pod answering at %s in %v", addr, time.Since(began).Round(time.Millisecond))
	return pod, ctr
}

// TestSecondNode runs each containerd on the second node (node.Second,
// through Options.Exec), as the Kubernetes harness's second node runs
// containerd 2: containerd is in that node's network and mount
// namespaces, its host-network workload answers on that node's address
// and not on the first node's, and the cleanup leaves no process.
func TestSecondNode(t *testing.T) {
	node.Get(t)
	for _, v := range Versions {
		t.Run(Name(v), func(t *testing.T) {
			var c *Containerd
			var pid int
			t.Run("run", func(t *testing.T) {
				second := node.Second(t, node.NewSpawner(t))
				c = Start(t, Options{Version: v, Exec: second.Exec, CNIBinDir: t.TempDir(), CNIConfDir: t.TempDir()})
				pid = c.pid()
				for _, ns := range []struct{ kind, want string }{{"net", second.NetNS.Path}, {"mnt", ""}} {
					got, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(pid), "ns", ns.kind))
					if err != nil {
						t.Fatal(err)
					}
					self, _ := os.Readlink("/proc/self/ns/" + ns.kind)
					if got == self {
						t.Fatalf("containerd is in the first node's %s namespace (%s)", ns.kind, got)
					}
					if ns.want != "" {
						var st syscall.Stat_t
						if err := syscall.Stat(ns.want, &st); err != nil || got != fmt.Sprintf("net:[%d]", st.Ino) {
							t.Fatalf("containerd's network namespace is %s, not the second node's %s (%v)", got, ns.want, err)
						}
					}
				}
				runHostWorkload(t, c, net.JoinHostPort(node.Node2IP, "8080"))
				if conn, err := net.DialTimeout("tcp", "127.0.0.1:8080", time.Second); err == nil {
					conn.Close()
					t.Fatal("the second node's host-network workload answers on the first node")
				}
			})
			if c == nil {
				return
			}
			if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
				t.Errorf("containerd (pid %d) still running after cleanup", pid)
			}
			if pids := shimPIDs(c.Address); len(pids) > 0 {
				t.Errorf("shims left after cleanup: %v", pids)
			}
			if dirs := cgroupDirs(c.CgroupParent); len(dirs) > 0 {
				t.Errorf("cgroups left after cleanup: %v", dirs)
			}
		})
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

// TestCoreDNSImage imports the CoreDNS image (images.CoreDNS) into each
// containerd version and runs it as the Kubernetes harness will: the
// image's own entrypoint and arguments, its Corefile mounted at
// images.CoreDNSConfDir. A query answered by the whoami plugin with the
// querier's address and port proves the binary serves in the container.
func TestCoreDNSImage(t *testing.T) {
	node.Get(t)
	for _, v := range Versions {
		t.Run(Name(v), func(t *testing.T) {
			c := Start(t, Options{Version: v, CNIBinDir: t.TempDir(), CNIConfDir: t.TempDir()})
			tarPath, ref := images.CoreDNS(t)
			began := time.Now()
			c.Import(t, tarPath)
			t.Logf("%s imported in %v", ref, time.Since(began).Round(time.Millisecond))

			// The node's namespace is the test's own: a fixed port is free.
			const addr = "127.0.0.1:1053"
			dir := t.TempDir()
			conf := filepath.Join(dir, "conf")
			if err := os.Mkdir(conf, 0o755); err != nil {
				t.Fatal(err)
			}
			corefile := ".:1053 {\n    bind 127.0.0.1\n    whoami\n}\n"
			if err := os.WriteFile(filepath.Join(conf, "Corefile"), []byte(corefile), 0o644); err != nil {
				t.Fatal(err)
			}
			podCfg := filepath.Join(dir, "pod.json")
			ctrCfg := filepath.Join(dir, "ctr.json")
			writeJSON(t, podCfg, map[string]any{
				"metadata":      map[string]any{"name": "coredns", "namespace": "e2e", "uid": "coredns-uid"},
				"log_directory": dir,
				"linux": map[string]any{
					"cgroup_parent":    c.CgroupParent,
					"security_context": map[string]any{"namespace_options": map[string]any{"network": 2, "pid": 1}},
				},
			})
			writeJSON(t, ctrCfg, map[string]any{
				"metadata": map[string]any{"name": "coredns"},
				"image":    map[string]any{"image": ref},
				"log_path": "coredns.log",
				"mounts":   []any{map[string]any{"container_path": images.CoreDNSConfDir, "host_path": conf, "readonly": true}},
			})
			began = time.Now()
			pod := strings.TrimSpace(c.Crictl(t, "runp", podCfg))
			ctr := strings.TrimSpace(c.Crictl(t, "create", "--no-pull", pod, ctrCfg, podCfg))
			c.Crictl(t, "start", ctr)

			deadline := time.Now().Add(15 * time.Second)
			for {
				got, err := whoami(addr, "qoscni.test.")
				if err == nil {
					t.Logf("CoreDNS in %s answering in %v: %s", Name(v), time.Since(began).Round(time.Millisecond), got)
					break
				}
				if time.Now().After(deadline) {
					logs, _ := c.TryCrictl("logs", ctr)
					t.Fatalf("CoreDNS at %s: %v\ncontainer log:\n%s", addr, err, logs)
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
}

// whoami sends an A query for name to the DNS server at addr over UDP and
// checks the whoami plugin's answer: the querier's address (an A record
// for name) and port (an SRV record), in the additional section.
func whoami(addr, name string) (string, error) {
	conn, err := net.Dial("udp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 0x5153, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
	}
	b, err := q.Pack()
	if err != nil {
		return "", err
	}
	if _, err := conn.Write(b); err != nil {
		return "", err
	}
	buf := make([]byte, 1500)
	n, err := conn.Read(buf)
	if err != nil {
		return "", err
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil {
		return "", err
	}
	if m.ID != q.ID || m.RCode != dnsmessage.RCodeSuccess {
		return "", fmt.Errorf("answer id %#x rcode %v", m.ID, m.RCode)
	}
	local := conn.LocalAddr().(*net.UDPAddr)
	var ip net.IP
	var port uint16
	for _, rr := range m.Additionals {
		switch r := rr.Body.(type) {
		case *dnsmessage.AResource:
			if rr.Header.Name.String() == name {
				ip = net.IP(r.A[:])
			}
		case *dnsmessage.SRVResource:
			port = r.Port
		}
	}
	if !ip.Equal(local.IP) || int(port) != local.Port {
		return "", fmt.Errorf("whoami answered %v port %d, want %v", ip, port, local)
	}
	return fmt.Sprintf("%s is %v port %d", name, ip, port), nil
}
