package cri_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/e2e/containerd"
	"github.com/qoscni/qoscni/test/e2e/images"
	"github.com/qoscni/qoscni/test/e2e/node"
)

// mode is how qoscni sits in the network config list.
type mode int

const (
	standalone mode = iota // "type": "qoscni" alone, built-in IPAM
	chained                // Debian's bridge + host-local, then qoscni
)

// referencePlugins are linked from Debian's containernetworking-plugins
// into each test's CNI bin dir (containerd runs loopback itself).
var referencePlugins = []string{"bridge", "host-local", "loopback", "portmap", "bandwidth"}

const (
	referencePluginDir = "/usr/lib/cni"
	// cniVersion: containerd 1.6's libcni speaks up to 1.0.0 (STATUS and GC
	// are 1.1.0; see cnitoolConflist).
	cniVersion = "1.0.0"
	// cniCacheDir is libcni's default result cache, which containerd
	// uses; private to the node (package test/e2e/node).
	cniCacheDir = "/var/lib/cni"
	podIfName   = "eth0"
	podNS       = "e2e"
)

// env is one test's node setup: CNI dirs, the conflist and a containerd.
type env struct {
	node     *node.Node
	mode     mode
	ctrd     *containerd.Containerd
	dir      string
	binDir   string
	confDir  string
	conflist string // the file containerd loads
	network  string
	bridge   string
	subnet4  string
	subnet6  string
	stateDir string // qoscni's records
	ipamDir  string // the IPAM store's dataDir (qoscni's or host-local's)
}

// eachContainerd runs test once per containerd version, as a subtest
// named after it, so that every result line says which runtime it was.
func eachContainerd(t *testing.T, test func(t *testing.T, version int)) {
	node.Get(t)
	for _, v := range containerd.Versions {
		t.Run(containerd.Name(v), func(t *testing.T) { test(t, v) })
	}
}

// newEnv writes a conflist for mode and starts containerd of the given
// major version on it. n keeps the tests' networks apart (bridge,
// subnets, state), also those of the two versions: a bridge the plugin
// made for one stays in the node for the next.
func newEnv(t *testing.T, version int, m mode, n int) *env {
	t.Helper()
	nd := node.Get(t)
	n += 10 * (version - 1)
	for _, p := range referencePlugins {
		if _, err := os.Stat(filepath.Join(referencePluginDir, p)); err != nil {
			msg := fmt.Sprintf("e2e: %s/%s missing (apt-get install containernetworking-plugins)", referencePluginDir, p)
			if os.Getenv(testnet.RequireRootEnv) != "" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
	dir := t.TempDir()
	e := &env{
		node:     nd,
		mode:     m,
		dir:      dir,
		binDir:   filepath.Join(dir, "bin"),
		confDir:  filepath.Join(dir, "net.d"),
		network:  fmt.Sprintf("qe2e-%d", n),
		bridge:   fmt.Sprintf("qe2ebr%d", n),
		subnet4:  fmt.Sprintf("10.213.%d.0/24", n),
		subnet6:  fmt.Sprintf("fd00:213:%d::/64", n),
		stateDir: filepath.Join(dir, "qoscni", "state"),
		ipamDir:  filepath.Join(dir, "ipam"),
	}
	for _, d := range []string{e.binDir, e.confDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	symlink(t, testnet.PluginBinary(t), filepath.Join(e.binDir, "qoscni"))
	for _, p := range referencePlugins {
		symlink(t, filepath.Join(referencePluginDir, p), filepath.Join(e.binDir, p))
	}
	e.conflist = filepath.Join(e.confDir, "10-"+e.network+".conflist")
	writeJSON(t, e.conflist, e.netConfList(cniVersion))
	e.ctrd = containerd.Start(t, containerd.Options{Version: version, CNIBinDir: e.binDir, CNIConfDir: e.confDir})
	return e
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

var capabilities = map[string]bool{
	"bandwidth":                         true,
	"portMappings":                      true,
	"io.kubernetes.cri.pod-annotations": true,
}

func (e *env) netConfList(version string) map[string]any {
	ranges := []any{
		[]any{map[string]any{"subnet": e.subnet4}},
		[]any{map[string]any{"subnet": e.subnet6}},
	}
	var plugins []any
	switch e.mode {
	case standalone:
		plugins = []any{map[string]any{
			"type":             "qoscni",
			"bridge":           e.bridge,
			"isGateway":        true,
			"isDefaultGateway": true,
			"ipMasq":           true,
			"hairpinMode":      true,
			"stateDir":         e.stateDir,
			"ipam":             map[string]any{"type": "qoscni", "ranges": ranges, "dataDir": e.ipamDir},
			"capabilities":     capabilities,
		}}
	case chained:
		plugins = []any{
			map[string]any{
				"type":             "bridge",
				"bridge":           e.bridge,
				"isGateway":        true,
				"isDefaultGateway": true,
				"hairpinMode":      true,
				"ipam":             map[string]any{"type": "host-local", "ranges": ranges, "dataDir": e.ipamDir},
			},
			// deploy/base/config/chained.json's shape.
			map[string]any{
				"type":         "qoscni",
				"stateDir":     e.stateDir,
				"capabilities": capabilities,
			},
		}
	}
	return map[string]any{"cniVersion": version, "name": e.network, "plugins": plugins}
}

// podSpec is what a test asks of a pod.
type podSpec struct {
	name        string
	annotations map[string]string
	ports       []portMapping
}

type portMapping struct {
	proto     string // "tcp" or "udp"
	container int
	host      int
}

// pod is a running pod sandbox with the workload container.
type pod struct {
	name, uid string
	id        string // sandbox ID: the CNI container ID
	container string
	ip, ip6   string
	netnsPath string      // CNI_NETNS, as containerd passed it
	netns     *testnet.NS // the same namespace by name, for testnet helpers
	removed   bool
}

// runPod creates the sandbox (CNI ADD), then creates and starts the
// workload and waits until it answers on its TCP port.
func (e *env) runPod(t *testing.T, s podSpec) *pod {
	t.Helper()
	p := &pod{name: s.name, uid: testnet.Unique(s.name + "-uid-")}
	dir := t.TempDir()
	var ports []any
	for _, pm := range s.ports {
		proto := 0 // CRI Protocol enum: TCP 0, UDP 1 (crictl wants the number)
		if pm.proto == "udp" {
			proto = 1
		}
		ports = append(ports, map[string]any{"protocol": proto, "container_port": pm.container, "host_port": pm.host})
	}
	podCfg := filepath.Join(dir, "pod.json")
	writeJSON(t, podCfg, map[string]any{
		"metadata":      map[string]any{"name": p.name, "namespace": podNS, "uid": p.uid, "attempt": 0},
		"hostname":      p.name,
		"log_directory": dir,
		"annotations":   s.annotations,
		"port_mappings": ports,
		"linux": map[string]any{
			"cgroup_parent": e.ctrd.CgroupParent,
			// NamespaceMode: POD 0, CONTAINER 1, NODE 2.
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 0, "pid": 1, "ipc": 0}},
		},
	})
	ctrCfg := filepath.Join(dir, "workload.json")
	writeJSON(t, ctrCfg, map[string]any{
		"metadata": map[string]any{"name": "workload"},
		"image":    map[string]any{"image": images.Workload},
		"log_path": "workload.log",
		"linux":    map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"pid": 1}}},
	})

	began := time.Now()
	p.id = strings.TrimSpace(e.ctrd.Crictl(t, "runp", podCfg))
	runp := time.Since(began)
	t.Cleanup(func() {
		if !p.removed {
			_, _ = e.ctrd.TryCrictl("stopp", p.id)
			_, _ = e.ctrd.TryCrictl("rmp", "-f", p.id)
		}
	})
	e.inspectPod(t, p)
	p.container = strings.TrimSpace(e.ctrd.Crictl(t, "create", "--no-pull", p.id, ctrCfg, podCfg))
	e.ctrd.Crictl(t, "start", p.container)
	line := retry(t, 15*time.Second, "workload answers on "+p.ip, func() (string, error) {
		return tcpLine(e.node.NetNS.Path, "tcp4", hostPort(p.ip, images.WorkloadTCPPort))
	})
	if !strings.HasPrefix(line, p.name+" ") {
		t.Fatalf("workload of %s answered %q", p.name, line)
	}
	t.Logf("pod %s: runp %v (sandbox %.12s, %s %s, netns %s), workload answering %v later",
		p.name, runp.Round(time.Millisecond), p.id, p.ip, p.ip6, p.netnsPath, (time.Since(began) - runp).Round(time.Millisecond))
	return p
}

// inspectPod reads the sandbox's state, addresses and network namespace.
func (e *env) inspectPod(t *testing.T, p *pod) {
	t.Helper()
	var in struct {
		Status struct {
			State   string `json:"state"`
			Network struct {
				IP            string `json:"ip"`
				AdditionalIPs []struct {
					IP string `json:"ip"`
				} `json:"additionalIps"`
			} `json:"network"`
		} `json:"status"`
		Info struct {
			Pid int `json:"pid"`
			containerd.SandboxSpec
		} `json:"info"`
	}
	out := e.ctrd.Crictl(t, "inspectp", "-o", "json", p.id)
	if err := json.Unmarshal([]byte(out), &in); err != nil {
		t.Fatalf("crictl inspectp: %v\n%s", err, out)
	}
	if in.Status.State != "SANDBOX_READY" {
		t.Fatalf("pod %s is %s, not SANDBOX_READY", p.name, in.Status.State)
	}
	p.ip = in.Status.Network.IP
	for _, a := range in.Status.Network.AdditionalIPs {
		if strings.Contains(a.IP, ":") {
			p.ip6 = a.IP
		}
	}
	if !strings.HasPrefix(p.ip, strings.TrimSuffix(e.subnet4, "0/24")) || p.ip6 == "" {
		t.Fatalf("pod %s addresses %q %q, want one from %s and one from %s", p.name, p.ip, p.ip6, e.subnet4, e.subnet6)
	}
	for _, ns := range in.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			p.netnsPath = ns.Path
		}
	}
	if p.netnsPath == "" {
		t.Fatalf("pod %s: no network namespace path in the runtime spec", p.name)
	}
	// containerd 1.6 bind-mounts the pod's netns under /run/netns (the
	// node's shared mount), so ip netns knows it by name; otherwise name
	// it from the sandbox's pid.
	if dir := filepath.Dir(p.netnsPath); dir == "/run/netns" || dir == "/var/run/netns" {
		name := filepath.Base(p.netnsPath)
		p.netns = &testnet.NS{Name: name, Path: filepath.Join("/run/netns", name)}
		return
	}
	name := testnet.Unique("qe2ep")
	testnet.Run(t, "ip", "netns", "attach", name, fmt.Sprint(in.Info.Pid))
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	p.netns = &testnet.NS{Name: name, Path: filepath.Join("/run/netns", name)}
}

// removePod stops and removes the pod as the kubelet does (CNI DEL on
// stop, again on remove) and fails the test when either fails.
func (e *env) removePod(t *testing.T, p *pod) {
	t.Helper()
	began := time.Now()
	e.ctrd.Crictl(t, "stopp", p.id)
	stopped := time.Since(began)
	e.ctrd.Crictl(t, "rmp", p.id)
	p.removed = true
	t.Logf("pod %s: stopp %v, rmp %v", p.name, stopped.Round(time.Millisecond), (time.Since(began) - stopped).Round(time.Millisecond))
	if out, err := e.ctrd.TryCrictl("inspectp", p.id); err == nil {
		t.Errorf("pod %s still known to containerd after rmp:\n%s", p.name, out)
	}
}

// cached is what containerd's libcni cached for an attachment: the
// CNI_ARGS and capability arguments it passed on ADD.
type cached struct {
	CniArgs        [][2]string    `json:"cniArgs"`
	CapabilityArgs map[string]any `json:"capabilityArgs"`
}

func (e *env) cacheFile(p *pod) string {
	return filepath.Join(cniCacheDir, "results", fmt.Sprintf("%s-%s-%s", e.network, p.id, podIfName))
}

func (e *env) cachedArgs(t *testing.T, p *pod) cached {
	t.Helper()
	b, err := os.ReadFile(e.cacheFile(p))
	if err != nil {
		t.Fatalf("containerd's CNI cache: %v", err)
	}
	var c cached
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatalf("containerd's CNI cache %s: %v", e.cacheFile(p), err)
	}
	return c
}

// cnitool builds cmd/qoscni-cnitool into the test's temp dir.
func cnitool(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..", "..")
	path := filepath.Join(t.TempDir(), "qoscni-cnitool")
	began := time.Now()
	cmd := exec.Command("go", "build", "-trimpath", "-o", path, "./cmd/qoscni-cnitool")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/qoscni-cnitool: %v\n%s", err, out)
	}
	t.Logf("built qoscni-cnitool in %v", time.Since(began).Round(time.Millisecond))
	return path
}

// runCnitool runs qoscni-cnitool in the node's network namespace (this
// process's) with the env's plugins on CNI_PATH.
func (e *env) runCnitool(t *testing.T, tool string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(tool, args...)
	cmd.Env = append(os.Environ(), "CNI_PATH="+e.binDir)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func writeJSON(t testing.TB, path string, v any) {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// retry calls f until it succeeds or timeout passes, then fails the test
// with the last error.
func retry(t *testing.T, timeout time.Duration, what string, f func() (string, error)) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := f()
		if err == nil {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v (for %v)", what, err, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
