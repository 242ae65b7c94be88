package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

const refCNIDir = "/usr/lib/cni"

var (
	toolOnce sync.Once
	toolPath string
	toolErr  error
)

// cnitoolBinary builds this command once per test process.
func cnitoolBinary(t *testing.T) string {
	t.Helper()
	toolOnce.Do(func() {
		dir, err := os.MkdirTemp("", "qoscni-cnitool-")
		if err != nil {
			toolErr = err
			return
		}
		toolPath = filepath.Join(dir, "qoscni-cnitool")
		_, file, _, _ := runtime.Caller(0)
		cmd := exec.Command("go", "build", "-o", toolPath, ".")
		cmd.Dir = filepath.Dir(file)
		if out, err := cmd.CombinedOutput(); err != nil {
			toolErr = fmt.Errorf("go build cnitool: %v\n%s", err, out)
		}
	})
	if toolErr != nil {
		t.Fatal(toolErr)
	}
	return toolPath
}

// requireRefPlugins skips (fails under QOSCNI_REQUIRE_ROOT) without the
// reference plugins, which `make deps` installs.
func requireRefPlugins(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(refCNIDir, "bridge")); err == nil {
		return
	}
	msg := "needs the reference CNI plugins in " + refCNIDir + " (apt-get install containernetworking-plugins)"
	if os.Getenv(testnet.RequireRootEnv) != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// tool runs the cnitool inside the node namespace, as a runtime would run
// the plugin, and returns stdout, stderr and the exit code.
func tool(t *testing.T, node *testnet.Node, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", node.Name, cnitoolBinary(t)}, args...)...)
	// The plugin registers its stateDir: in the node's registry, not the machine's.
	cmd.Env = append(os.Environ(), state.RegistryEnv+"="+node.Registry)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("run cnitool: %v", err)
	}
	return stdout.String(), stderr.String(), code
}

type network struct {
	name     string
	cniPath  string
	conflist string
	dirs     []string // where the network keeps per-attachment records
}

// networks are the reference bridge (the tool must work with any plugin)
// and qoscni. The reference chain leaves out portmap: v1.1.1 fails CHECK on
// an IPv4-only network (it looks for its IPv6 chain).
func networks(t *testing.T, node *testnet.Node) []network {
	plugin := testnet.PluginBinary(t)
	refIPAM := filepath.Join(node.Dir, "ref-ipam")
	return []network{
		{
			name:    "reference",
			cniPath: refCNIDir,
			conflist: fmt.Sprintf(`{"cniVersion":"1.0.0","name":"refnet","plugins":[
			 {"type":"bridge","bridge":"refbr0","isGateway":true,"isDefaultGateway":true,"ipMasq":true,
			  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.23.0.0/16"}]],"dataDir":%q}}]}`, refIPAM),
			dirs: []string{refIPAM},
		},
		{
			name:    "qoscni",
			cniPath: filepath.Dir(plugin) + ":" + refCNIDir,
			conflist: fmt.Sprintf(`{"cniVersion":"1.1.0","name":"qoscni","plugins":[{"type":"qoscni",
			 "isGateway":true,"isDefaultGateway":true,"ipMasq":true,"stateDir":%q,
			 "ipam":{"type":"qoscni","ranges":[[{"subnet":"10.22.0.0/16"}],[{"subnet":"fd00:22::/64"}]],"dataDir":%q},
			 "capabilities":{"portMappings":true,"bandwidth":true}}]}`, node.StateDir, node.IPAMDir),
			dirs: []string{node.StateDir, node.IPAMDir},
		},
	}
}

func writeConflist(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "net.conflist")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// leftovers lists files an IPAM or state dir keeps per attachment.
func leftovers(t *testing.T, dirs ...string) []string {
	t.Helper()
	var out []string
	for _, d := range dirs {
		_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err != nil || e.IsDir() {
				return nil
			}
			if n := e.Name(); n == "lock" || n == ".lock" || strings.HasPrefix(n, "last_reserved_ip.") {
				return nil
			}
			out = append(out, p)
			return nil
		})
	}
	return out
}

func TestAddCheckDelGC(t *testing.T) {
	node := testnet.NewNode(t)
	requireRefPlugins(t)
	for _, nw := range networks(t, node) {
		t.Run(nw.name, func(t *testing.T) {
			conf := writeConflist(t, nw.conflist)
			cache := t.TempDir()
			pod := node.NewPod(t)
			common := []string{"--conflist", conf, "--cni-path", nw.cniPath, "--cache-dir", cache}
			att := append([]string{"--netns", pod.Path, "--id", "ctr-" + nw.name, "--ifname", "eth0",
				"--args", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
				"--cap-args", `{"portMappings":[{"hostPort":18080,"containerPort":80,"protocol":"tcp"}]}`}, common...)

			out, stderr, code := tool(t, node, append([]string{"add"}, att...)...)
			if code != 0 {
				t.Fatalf("add: exit %d\n%s", code, stderr)
			}
			var res struct {
				IPs []struct{ Address string } `json:"ips"`
			}
			if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.IPs) == 0 {
				t.Fatalf("add printed no result with IPs (%v):\n%s", err, out)
			}
			addr, _, _ := strings.Cut(res.IPs[0].Address, "/")
			if got := pod.Exec(t, "ip", "-o", "addr", "show", "dev", "eth0"); !strings.Contains(got, addr+"/") {
				t.Fatalf("pod eth0 lacks %s:\n%s", addr, got)
			}

			if _, stderr, code := tool(t, node, append([]string{"check"}, att...)...); code != 0 {
				t.Fatalf("check: exit %d\n%s", code, stderr)
			}
			if _, stderr, code := tool(t, node, append([]string{"status"}, common...)...); code != 0 {
				t.Fatalf("status: exit %d\n%s", code, stderr)
			}
			// A GC that lists the attachment as valid must keep it.
			if _, stderr, code := tool(t, node, append([]string{"gc", "--valid", "ctr-" + nw.name + "/eth0"}, common...)...); code != 0 {
				t.Fatalf("gc keeping it: exit %d\n%s", code, stderr)
			}
			if _, err := pod.Try("ip", "link", "show", "dev", "eth0"); err != nil {
				t.Fatalf("gc removed a valid attachment: %v", err)
			}
			// One that does not must delete it, as libcni DELs stale cached attachments.
			if _, stderr, code := tool(t, node, append([]string{"gc"}, common...)...); code != 0 {
				t.Fatalf("gc: exit %d\n%s", code, stderr)
			}
			if _, err := pod.Try("ip", "link", "show", "dev", "eth0"); err == nil {
				t.Fatal("gc left eth0 of a stale attachment")
			}
			// DEL after GC is idempotent, as the spec requires.
			if _, stderr, code := tool(t, node, append([]string{"del"}, att...)...); code != 0 {
				t.Fatalf("del: exit %d\n%s", code, stderr)
			}
			if left := leftovers(t, append(nw.dirs, cache)...); len(left) > 0 {
				t.Fatalf("left behind: %v", left)
			}
		})
	}
}

func TestAddFailureIsReported(t *testing.T) {
	node := testnet.NewNode(t)
	requireRefPlugins(t)
	nw := networks(t, node)[1]
	conf := writeConflist(t, nw.conflist)
	out, stderr, code := tool(t, node, "add", "--conflist", conf, "--cni-path", nw.cniPath,
		"--cache-dir", t.TempDir(), "--netns", "/run/netns/does-not-exist-qoscni", "--id", "x")
	if code != exitFailed {
		t.Fatalf("exit %d, want %d; stdout:\n%s", code, exitFailed, out)
	}
	if !strings.Contains(stderr, "qoscni-cnitool add:") || !strings.Contains(stderr, `"code"`) {
		t.Fatalf("stderr lacks the CNI error:\n%s", stderr)
	}
	if _, _, code := tool(t, node, "add", "--conflist", conf); code != exitUsage {
		t.Fatalf("missing --id: exit %d, want %d", code, exitUsage)
	}
}

func TestBenchCleansUp(t *testing.T) {
	node := testnet.NewNode(t)
	requireRefPlugins(t)
	for _, nw := range networks(t, node) {
		t.Run(nw.name, func(t *testing.T) {
			conf := writeConflist(t, nw.conflist)
			prefix := testnet.Unique("qcbt")
			out, stderr, code := tool(t, node, "bench", "--conflist", conf, "--cni-path", nw.cniPath,
				"--population", "3", "--cycles", "2", "--parallel", "2", "--prefix", prefix, "--format", "json", "--quiet")
			if code != 0 {
				t.Fatalf("bench: exit %d\n%s", code, stderr)
			}
			var res struct {
				Population int
				Add, Del   struct {
					N     int
					P50Ms float64
				}
			}
			if err := json.Unmarshal([]byte(out), &res); err != nil {
				t.Fatalf("bench output is not JSON (%v):\n%s", err, out)
			}
			if res.Population != 3 || res.Add.N != 2 || res.Del.N != 2 || res.Add.P50Ms <= 0 {
				t.Fatalf("unexpected bench result: %+v", res)
			}
			if m, _ := filepath.Glob("/run/netns/" + prefix + "-*"); len(m) > 0 {
				t.Fatalf("bench left namespaces: %v", m)
			}
			if links := node.Exec(t, "ip", "-o", "link", "show", "type", "veth"); strings.TrimSpace(links) != "" {
				t.Fatalf("bench left veths in the node:\n%s", links)
			}
			if left := leftovers(t, nw.dirs...); len(left) > 0 {
				t.Fatalf("bench left reservations or state: %v", left)
			}
		})
	}
}
