// Package containerd runs a private containerd, with its CRI plugin, for an
// end-to-end test: its own config, root, state and socket in the test's
// temp dir, the e2e images imported, and everything it started (pod
// sandboxes, shims, containers, mounts, cgroups) removed when the test
// ends, also when it fails.
//
// Two containerds, as nodes run during an upgrade: Debian's 1.6 (its
// packages: containerd, containerd-shim-runc-v2, ctr) and containerd 2
// built and cached by test/e2e/build.sh (containerd2, containerd2-shim,
// ctr2). Both use Debian's runc.
//
// The test is expected to run on a node of its own (package test/e2e/node):
// containerd still writes a few fixed host paths (/run/containerd/s for its
// shims' sockets, /run/containerd/runc for runc's state, /run/netns for pod
// namespaces, /var/lib/cni for the CNI result cache), which the node's
// mount namespace covers. Options.Exec runs it on another node (the
// second node's nsenter prefix), in that node's namespaces.
//
//	ctrd := containerd.Start(t, containerd.Options{Version: 2, CNIBinDir: bin, CNIConfDir: conf})
//	ctrd.Import(t, tarball) // with the ctr that matches the daemon
//	id := strings.TrimSpace(ctrd.Crictl(t, "runp", "pod.json"))
package containerd

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/e2e/cluster"
	"github.com/qoscni/qoscni/test/e2e/images"
	"github.com/qoscni/qoscni/test/e2e/node"
)

const (
	readyTimeout = 60 * time.Second
	stopTimeout  = 20 * time.Second
	// crictlTimeout is crictl's per-request timeout: a runp with a slow
	// CNI ADD must not be cut short, a hung containerd must not hang the
	// test.
	crictlTimeout = "30s"
	// maxSocketPath leaves room below the 108 bytes of sun_path.
	maxSocketPath = 100
)

// SandboxSpec is the part of `crictl inspectp -o json`'s info that names
// the sandbox's namespaces (embed it in a struct for the info object).
type SandboxSpec struct {
	RuntimeSpec struct {
		Linux struct {
			Namespaces []struct {
				Type string `json:"type"`
				Path string `json:"path"`
			} `json:"namespaces"`
		} `json:"linux"`
	} `json:"runtimeSpec"`
}

// Versions are the containerd major versions Start runs: a suite that
// proves something for every runtime runs once per entry (Name says which
// in the test's name).
var Versions = []int{1, 2}

// Name is how test names and logs call containerd major version v.
func Name(v int) string {
	if v == 2 {
		return "containerd2"
	}
	return "containerd1.6"
}

// Options configure the CRI plugin.
type Options struct {
	// Version is containerd's major version: 1 (or 0) for Debian's 1.6,
	// 2 for the cached containerd 2.
	Version int
	// CNIBinDir and CNIConfDir are the CRI plugin's cni bin_dir and
	// conf_dir (required).
	CNIBinDir, CNIConfDir string
	// CNIMaxConfNum is the number of network configs the CRI plugin
	// loads from CNIConfDir (max_conf_num); 0 means 1.
	CNIMaxConfNum int
	// Exec is the command prefix of the node containerd runs on
	// (node.Node.Exec): nil for the test's own node. Its shims, pods and
	// mounts are then that node's; what containerd leaves mounted there
	// goes with the node's mount namespace at the end of the test.
	Exec []string
}

// binaries are the programs of one containerd version.
type binaries struct {
	containerd, shim, ctr string
}

// lookBinaries finds version v's programs, skipping the test (failing it
// where CI promised them) when they are not installed or built.
func lookBinaries(t testing.TB, v int) binaries {
	t.Helper()
	if v == 2 {
		return binaries{
			containerd: cluster.Binary(t, "containerd2"),
			shim:       cluster.Binary(t, "containerd2-shim"),
			ctr:        cluster.Binary(t, "ctr2"),
		}
	}
	var b binaries
	for _, p := range []struct {
		name string
		path *string
	}{{"containerd", &b.containerd}, {"containerd-shim-runc-v2", &b.shim}, {"ctr", &b.ctr}} {
		path, err := exec.LookPath(p.name)
		if err != nil {
			notInstalled(t, p.name)
		}
		*p.path = path
	}
	return b
}

func notInstalled(t testing.TB, bin string) {
	t.Helper()
	msg := fmt.Sprintf("e2e: %s is not installed (apt-get install containerd runc)", bin)
	if os.Getenv(testnet.RequireRootEnv) != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Containerd is a running private containerd.
type Containerd struct {
	// Version is the major version running (1 or 2).
	Version int
	// Ctr is the ctr binary of that version.
	Ctr string
	// Address is the gRPC (and CRI) unix socket path.
	Address string
	// Dir holds config.toml, root/, state/, the log and crictl's config.
	Dir string
	// Root and State are containerd's root and state directories.
	Root, State string
	// Config is the config.toml file; Log is containerd's stdout+stderr.
	Config, Log string
	// CgroupParent is the cgroup (cgroupfs) pod sandboxes must name in
	// linux.cgroup_parent, so that what their containers leave in the
	// host's cgroup hierarchies is found and removed at cleanup.
	CgroupParent string

	opts       Options
	bin        binaries
	crictl     string
	crictlConf string
	sp         *node.Spawner
	mu         sync.Mutex
	proc       *node.Process
}

// Start writes a config for o, starts containerd of o.Version, waits
// until its CRI answers (and, when CNIConfDir holds a network config,
// reports the network ready), imports the e2e images and registers the
// cleanup. It skips the test when crictl or containerd 2 is not built
// (cluster.Binary) or containerd 1.6 is not installed.
func Start(t testing.TB, o Options) *Containerd {
	t.Helper()
	// containerd writes fixed host paths (see the package doc) that only
	// a node's mount namespace keeps off the machine.
	node.Get(t)
	testnet.RequireRoot(t)
	if o.CNIBinDir == "" || o.CNIConfDir == "" {
		t.Fatal("containerd.Start: Options.CNIBinDir and CNIConfDir are required")
	}
	if o.CNIMaxConfNum == 0 {
		o.CNIMaxConfNum = 1
	}
	switch o.Version {
	case 0:
		o.Version = 1
	case 1, 2:
	default:
		t.Fatalf("containerd.Start: Options.Version %d: want 1 (Debian's 1.6) or 2", o.Version)
	}
	if _, err := exec.LookPath("runc"); err != nil {
		notInstalled(t, "runc")
	}
	bin := lookBinaries(t, o.Version)
	crictl := cluster.Binary(t, "crictl")

	dir := t.TempDir()
	sockDir := dir
	if len(filepath.Join(dir, "containerd.sock.ttrpc")) > maxSocketPath {
		// A long test name makes a temp dir too deep for a unix socket.
		d, err := os.MkdirTemp("", "qctrd-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		sockDir = d
	}
	c := &Containerd{
		Version:      o.Version,
		Ctr:          bin.ctr,
		Address:      filepath.Join(sockDir, "containerd.sock"),
		Dir:          dir,
		Root:         filepath.Join(dir, "root"),
		State:        filepath.Join(dir, "state"),
		Config:       filepath.Join(dir, "config.toml"),
		Log:          filepath.Join(dir, "containerd.log"),
		CgroupParent: "/" + testnet.Unique("qoscni-e2e-"),
		opts:         o,
		bin:          bin,
		crictl:       crictl,
		crictlConf:   filepath.Join(dir, "crictl.yaml"),
	}
	if err := os.WriteFile(c.Config, []byte(c.config(o)), 0o644); err != nil {
		t.Fatal(err)
	}
	ep := "unix://" + c.Address
	crictlYAML := fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 30\ndebug: false\npull-image-on-create: false\n", ep, ep)
	if err := os.WriteFile(c.crictlConf, []byte(crictlYAML), 0o644); err != nil {
		t.Fatal(err)
	}

	c.sp = node.NewSpawner(t) // its cleanup runs last
	t.Cleanup(func() { c.cleanup(t) })

	began := time.Now()
	c.start(t, hasNetworkConfig(o.CNIConfDir))
	t.Logf("%s ready in %v (pid %d, log %s)", Name(c.Version), time.Since(began).Round(time.Millisecond), c.pid(), c.Log)

	began = time.Now()
	pause, workload := images.Build(t, dir)
	c.Import(t, pause, workload)
	// The CRI plugin learns of imported images from events; runp would
	// try to pull a sandbox image it has not seen yet.
	c.waitFor(t, readyTimeout, "CRI sees the e2e images", func() error {
		for _, ref := range []string{images.Pause, images.Workload} {
			if out, err := c.TryCrictl("inspecti", "-q", ref); err != nil {
				return fmt.Errorf("inspecti %s: %v: %s", ref, err, out)
			}
		}
		return nil
	})
	t.Logf("%s: images imported in %v", Name(c.Version), time.Since(began).Round(time.Millisecond))
	return c
}

// Import imports docker-archive tarballs into the CRI's namespace with
// this containerd's own ctr (images.ImportWith).
func (c *Containerd) Import(t testing.TB, tars ...string) {
	t.Helper()
	images.ImportWith(t, c.Ctr, c.Address, tars...)
}

func (c *Containerd) config(o Options) string {
	if o.Version == 2 {
		return c.configV3(o)
	}
	return c.configV2(o)
}

// configV2 is containerd 1.6's config.toml (version 2).
func (c *Containerd) configV2(o Options) string {
	q := strconv.Quote
	return fmt.Sprintf(`version = 2
root = %s
state = %s
oom_score = 0

# Unused here; opt would also create /opt/containerd on the host.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.internal.v1.opt",
]

[grpc]
  address = %s

[ttrpc]
  address = %s

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %s
  # runc cannot raise oom_score_adj on these machines.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %s
    conf_dir = %s
    max_conf_num = %d
`, q(c.Root), q(c.State), q(c.Address), q(c.Address+".ttrpc"), q(images.Pause),
		q(o.CNIBinDir), q(o.CNIConfDir), o.CNIMaxConfNum)
}

// configV3 is containerd 2's config.toml, in the version 3 format its
// documentation recommends: the CRI plugin is split into
// io.containerd.cri.v1.images (snapshotter, sandbox image),
// io.containerd.cri.v1.runtime (runtimes, CNI) and io.containerd.grpc.v1.cri
// (the CRI server and its streaming).
func (c *Containerd) configV3(o Options) string {
	q := strconv.Quote
	return fmt.Sprintf(`version = 3
root = %s
state = %s
oom_score = 0

# Unused here; opt would also create /opt/containerd on the host, NRI
# /var/run/nri/nri.sock. The block-backed snapshotters need images made
# for them.
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.internal.v1.opt",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = %s

[ttrpc]
  address = %s

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %s

[plugins."io.containerd.cri.v1.runtime"]
  # runc cannot raise oom_score_adj on these machines.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true

  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"

    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      # The shim of this containerd, not Debian's 1.6 one on PATH.
      runtime_path = %s

      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [%s]
    conf_dir = %s
    max_conf_num = %d

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
`, q(c.Root), q(c.State), q(c.Address), q(c.Address+".ttrpc"), q(images.Pause), q(c.bin.shim),
		q(o.CNIBinDir), q(o.CNIConfDir), o.CNIMaxConfNum)
}

func hasNetworkConfig(dir string) bool {
	for _, pat := range []string{"*.conf", "*.conflist", "*.json"} {
		if m, _ := filepath.Glob(filepath.Join(dir, pat)); len(m) > 0 {
			return true
		}
	}
	return false
}

// start spawns containerd on c's config and waits until it is ready.
func (c *Containerd) start(t testing.TB, wantNetwork bool) {
	t.Helper()
	// A socket left by a killed containerd would make the wait below
	// talk to nothing for a while; containerd replaces it anyway.
	_ = os.Remove(c.Address)
	cmd := append(append(append([]string{}, c.opts.Exec...), c.bin.containerd), "--config", c.Config)
	p, err := c.sp.Start("containerd", c.Log, cmd[0], cmd[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.proc = p
	c.mu.Unlock()
	deadline := time.Now().Add(readyTimeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.Done:
			t.Fatalf("containerd exited while starting: %v\nlast lines of %s:\n%s", p.Err, c.Log, node.Tail(c.Log))
		default:
		}
		if last = c.ready(wantNetwork); last == nil {
			return
		}
		// containerd serves on without a plugin that failed to load.
		if line := criLoadFailure(c.Log); line != "" {
			t.Fatalf("containerd's CRI plugin did not load: %s\nlast lines of %s:\n%s", line, c.Log, node.Tail(c.Log))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("containerd not ready after %v: %v\nlast lines of %s:\n%s", readyTimeout, last, c.Log, node.Tail(c.Log))
}

// criPlugins are the IDs of the CRI plugins: 1.6 has one, 2.x three.
var criPlugins = []string{"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images"}

// criLoadFailure is the line of the containerd log at path that says a CRI
// plugin failed to load: 1.6 writes `failed to load plugin <id>`, 2.x
// `msg="failed to load plugin" ... id=<id>`.
func criLoadFailure(path string) string {
	b, _ := os.ReadFile(path)
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, "failed to load plugin") {
			continue
		}
		for _, id := range criPlugins {
			if strings.Contains(line, id) {
				return line
			}
		}
	}
	return ""
}

// ready is nil once crictl info says the runtime (and, if wanted, the
// network) is ready.
func (c *Containerd) ready(wantNetwork bool) error {
	out, err := exec.Command(c.crictl, c.crictlArgs("--timeout", "2s", "info")...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("crictl info: %v: %s", err, lastLine(out))
	}
	var info struct {
		Status struct {
			Conditions []struct {
				Type    string `json:"type"`
				Status  bool   `json:"status"`
				Reason  string `json:"reason"`
				Message string `json:"message"`
			} `json:"conditions"`
		} `json:"status"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("crictl info: %v", err)
	}
	want := []string{"RuntimeReady"}
	if wantNetwork {
		want = append(want, "NetworkReady")
	}
	for _, w := range want {
		found := false
		for _, cond := range info.Status.Conditions {
			if cond.Type != w {
				continue
			}
			found = true
			if !cond.Status {
				return fmt.Errorf("%s: %s %s", w, cond.Reason, cond.Message)
			}
		}
		if !found {
			return fmt.Errorf("crictl info: no %s condition", w)
		}
	}
	return nil
}

func (c *Containerd) waitFor(t testing.TB, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd: waiting for %s: %v\nlast lines of %s:\n%s", what, err, c.Log, node.Tail(c.Log))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Containerd) pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return 0
	}
	return c.proc.Cmd.Process.Pid
}

// Restart stops containerd with SIGTERM (shims and pods keep running, as
// on a node whose containerd is upgraded) and starts it again on the same
// config and directories, waiting until it is ready.
func (c *Containerd) Restart(t testing.TB) {
	t.Helper()
	began := time.Now()
	c.mu.Lock()
	p := c.proc
	c.mu.Unlock()
	if p != nil {
		p.Stop(t, stopTimeout)
	}
	stopped := time.Since(began)
	c.start(t, hasNetworkConfig(c.opts.CNIConfDir))
	t.Logf("%s restarted: stopped in %v, ready again in %v (pid %d)", Name(c.Version),
		stopped.Round(time.Millisecond), (time.Since(began) - stopped).Round(time.Millisecond), c.pid())
}

func (c *Containerd) crictlArgs(args ...string) []string {
	ep := "unix://" + c.Address
	base := []string{"--config", c.crictlConf, "--runtime-endpoint", ep, "--image-endpoint", ep}
	if !slices.Contains(args, "--timeout") {
		base = append(base, "--timeout", crictlTimeout)
	}
	return append(base, args...)
}

// Crictl runs crictl against this containerd and returns its stdout; it
// fails the test with crictl's output when crictl fails.
func (c *Containerd) Crictl(t testing.TB, args ...string) string {
	t.Helper()
	cmd := exec.Command(c.crictl, c.crictlArgs(args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("crictl %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// TryCrictl runs crictl and returns its combined output and error.
func (c *Containerd) TryCrictl(args ...string) (string, error) {
	out, err := exec.Command(c.crictl, c.crictlArgs(args...)...).CombinedOutput()
	return string(out), err
}

// cleanup removes the pods (their CNI DEL runs), stops containerd, and
// removes whatever survived it: shims, container processes, mounts and
// cgroups.
func (c *Containerd) cleanup(t testing.TB) {
	c.mu.Lock()
	p := c.proc
	c.mu.Unlock()
	var netnsPaths []string
	if p != nil {
		select {
		case <-p.Done:
			t.Logf("containerd had exited (%v): pods are not removed through the CRI", p.Err)
		default:
			netnsPaths = c.podNetNSPaths()
			if out, err := c.TryCrictl("rmp", "-fa"); err != nil {
				t.Errorf("cleanup: crictl rmp -fa: %v\n%s", err, out)
			}
		}
		p.Stop(t, stopTimeout)
		if t.Failed() || os.Getenv(cluster.LogsEnv) != "" {
			t.Logf("last lines of %s:\n%s", c.Log, node.Tail(c.Log))
		}
	}
	// Pod namespaces of processes still running after that: containerd
	// died, or failed to remove a pod.
	netnsPaths = append(netnsPaths, netnsMounts(cgroupNetNS(c.CgroupParent))...)
	if n := killShims(c.Address); n > 0 {
		t.Logf("cleanup: killed %d leftover containerd-shim-runc-v2 processes (and their containers)", n)
	}
	if n := killCgroup(c.CgroupParent); n > 0 {
		t.Logf("cleanup: killed %d leftover processes in cgroup %s", n, c.CgroupParent)
	}
	if err := removeCgroup(c.CgroupParent); err != nil {
		t.Errorf("cleanup: %v", err)
	}
	for _, dir := range []string{c.State, c.Root} {
		if err := node.UnmountUnder(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
	// A pod namespace containerd did not get to remove: its file is in
	// the host's /run/netns (the node shares the directory, not the mount).
	slices.Sort(netnsPaths)
	for _, ns := range slices.Compact(netnsPaths) {
		if !criNetNS(ns) {
			continue
		}
		if _, err := os.Lstat(ns); err != nil {
			continue
		}
		t.Logf("cleanup: removing pod network namespace %s left by containerd", ns)
		if err := node.UnmountUnder(ns); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if err := os.Remove(ns); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
}

// cgroupNetNS are the network namespaces ("net:[inode]") of the processes
// in parent's cgroups.
func cgroupNetNS(parent string) map[string]bool {
	nss := map[string]bool{}
	for _, d := range cgroupDirs(parent) {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, pid := range strings.Fields(string(b)) {
			if l, err := os.Readlink(filepath.Join("/proc", pid, "ns", "net")); err == nil {
				nss[l] = true
			}
		}
	}
	return nss
}

// netnsMounts are the mount points of the namespaces in nss that the CRI
// plugin made (/run/netns/cni-*; mountinfo's root field of an nsfs mount
// is "net:[inode]"). The node's own namespace, which host-network pods
// share, is never one of them.
func netnsMounts(nss map[string]bool) []string {
	if self, err := os.Readlink("/proc/self/ns/net"); err == nil {
		delete(nss, self)
	}
	if len(nss) == 0 {
		return nil
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var mps []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || !nss[f[3]] {
			continue
		}
		mp := node.UnescapeMount(f[4])
		if criNetNS(mp) {
			mps = append(mps, mp)
		}
	}
	return mps
}

// criNetNS reports whether path is named as the CRI plugin names a pod's
// network namespace.
func criNetNS(path string) bool {
	dir, name := filepath.Split(path)
	return (dir == "/run/netns/" || dir == "/var/run/netns/") && strings.HasPrefix(name, "cni-")
}

// podNetNSPaths are the network namespace files of the pods containerd
// knows.
func (c *Containerd) podNetNSPaths() []string {
	out, err := c.TryCrictl("pods", "-q")
	if err != nil {
		return nil
	}
	var paths []string
	for _, id := range strings.Fields(out) {
		raw, err := exec.Command(c.crictl, c.crictlArgs("inspectp", "-o", "json", id)...).Output()
		if err != nil {
			continue
		}
		var in struct {
			Info SandboxSpec `json:"info"`
		}
		if json.Unmarshal(raw, &in) != nil {
			continue
		}
		for _, ns := range in.Info.RuntimeSpec.Linux.Namespaces {
			if ns.Type == "network" && ns.Path != "" {
				paths = append(paths, ns.Path)
			}
		}
	}
	return paths
}

// killShims SIGKILLs the shims started for the containerd at address, and
// every process below them (a container outlives a killed shim), and
// returns how many shims there were.
func killShims(address string) int {
	shims := shimPIDs(address)
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			if ppid := parentPID(pid); ppid > 0 {
				children[ppid] = append(children[ppid], pid)
			}
		}
	}
	var victims []int
	var walk func(int)
	walk = func(pid int) {
		victims = append(victims, pid)
		for _, ch := range children[pid] {
			walk(ch)
		}
	}
	for _, s := range shims {
		walk(s)
	}
	// Children first, so that no shim reaps and restarts anything.
	for i := len(victims) - 1; i >= 0; i-- {
		_ = syscall.Kill(victims[i], syscall.SIGKILL)
	}
	waitGone(victims, 5*time.Second)
	return len(shims)
}

// shimPIDs are the containerd-shim-runc-v2 processes whose -address is
// the containerd socket at address.
func shimPIDs(address string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if len(args) == 0 || filepath.Base(args[0]) != "containerd-shim-runc-v2" {
			continue
		}
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-address" && args[i+1] == address {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

func parentPID(pid int) int {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

func waitGone(pids []int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, pid := range pids {
		for time.Now().Before(deadline) {
			// A zombie is gone for our purpose: it holds no namespace.
			b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
			if err != nil || strings.Contains(string(b), ") Z ") {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// cgroupDirs are parent's directories in every mounted cgroup hierarchy
// (cgroup v1 has one per controller, v2 one), deepest first.
func cgroupDirs(parent string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var dirs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 0 || sep+1 >= len(fields) || len(fields) < 5 {
			continue
		}
		if fs := fields[sep+1]; fs != "cgroup" && fs != "cgroup2" {
			continue
		}
		root := filepath.Join(node.UnescapeMount(fields[4]), parent)
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return slices.Compact(dirs)
}

// killCgroup SIGKILLs every process in parent's cgroups and returns how
// many there were.
func killCgroup(parent string) int {
	seen := map[int]bool{}
	for _, d := range cgroupDirs(parent) {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && !seen[pid] {
				seen[pid] = true
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	pids := make([]int, 0, len(seen))
	for pid := range seen {
		pids = append(pids, pid)
	}
	waitGone(pids, 5*time.Second)
	return len(pids)
}

// removeCgroup removes parent's cgroup directories, deepest first. A
// cgroup whose last process just died can be busy for a moment.
func removeCgroup(parent string) error {
	var errs []error
	for _, d := range cgroupDirs(parent) {
		var err error
		for i := 0; i < 50; i++ {
			if err = unix.Rmdir(d); err == nil || errors.Is(err, unix.ENOENT) {
				err = nil
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
