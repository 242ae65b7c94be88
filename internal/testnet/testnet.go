// Package testnet gives kernel tests their own world: a fresh network
// namespace standing for the node, pod namespaces beside it, and a way to
// run the plugin binary inside the node namespace. Everything is removed
// by t.Cleanup, also when the test fails.
package testnet

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"
)

// RequireRootEnv turns every "needs root" skip into a failure (CI sets it).
const RequireRootEnv = "QOSCNI_REQUIRE_ROOT"

// PureOnlyEnv skips every kernel test, also under RequireRootEnv. make
// race sets it to run the pure tests of packages that have kernel tests
// too under the race detector, which would make namespaces and traffic
// slow; the plain run of make unit runs the kernel tests, where
// RequireRootEnv proves they ran.
const PureOnlyEnv = "QOSCNI_PURE_ONLY"

// RequireRoot skips (or, under QOSCNI_REQUIRE_ROOT, fails) a kernel test
// when the process cannot create namespaces. Every kernel test calls it
// (NewNode does), so it also marks what a pure-only run skips.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Getenv(PureOnlyEnv) != "" {
		t.Skip("kernel test: not run in a pure-only run (" + PureOnlyEnv + ")")
	}
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("ip"); err == nil {
			return
		}
		msg := "kernel test needs the ip command (apt-get install iproute2)"
		if os.Getenv(RequireRootEnv) != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	msg := "kernel test needs root (network namespaces, veth, nftables)"
	if os.Getenv(RequireRootEnv) != "" {
		t.Fatalf("%s, and %s is set", msg, RequireRootEnv)
	}
	t.Skip(msg)
}

// Unique returns a short random name with a prefix, unique across the
// parallel test packages of one run.
func Unique(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// Run executes a command and fails the test on error, returning stdout.
// stderr stays out of what is returned: iproute2 reports a dump that a
// concurrent change interrupted there, with exit status 0, and a test
// parsing the output took that line for data.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.String()
}

// NS is a named network namespace under /run/netns.
type NS struct {
	Name string
	Path string
}

// Qdiscs lists a device's qdiscs as kind, handle and parent, one per
// line, without the counters that traffic (IPv6 router solicitations)
// moves: two calls compare equal when nothing was added, removed or
// re-parented.
func (n *NS) Qdiscs(t testing.TB, dev string) string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(n.Exec(t, "tc", "qdisc", "show", "dev", dev), "\n") {
		if f := strings.Fields(l); len(f) >= 4 {
			out = append(out, strings.Join(f[:4], " "))
		}
	}
	return strings.Join(out, "\n")
}

// NewNS creates a namespace with loopback up, removed at cleanup.
func NewNS(t testing.TB, prefix string) *NS {
	t.Helper()
	name := Unique(prefix)
	Run(t, "ip", "netns", "add", name)
	ns := &NS{Name: name, Path: filepath.Join("/run/netns", name)}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return ns
}

// Exec runs a command inside the namespace.
func (n *NS) Exec(t testing.TB, name string, args ...string) string {
	t.Helper()
	return Run(t, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Try runs a command inside the namespace and returns its error.
func (n *NS) Try(name string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...).CombinedOutput()
	return string(out), err
}

// Node is a fresh node namespace plus private state and IPAM directories.
type Node struct {
	*NS
	Dir      string // holds state/, ipam/ and statedirs/
	StateDir string
	IPAMDir  string
	// Registry is the node's registry of state directories: Invoke points
	// the plugin at it, so no test writes to the machine's /var/lib/cni.
	Registry string
	t        testing.TB
}

// NewNode creates the node namespace and its directories.
func NewNode(t testing.TB) *Node {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	n := &Node{NS: NewNS(t, "qn"), Dir: dir, StateDir: filepath.Join(dir, "state"), IPAMDir: filepath.Join(dir, "ipam"),
		Registry: filepath.Join(dir, "statedirs"), t: t}
	return n
}

// OnTmpfs mounts a tmpfs over the node's Dir (state, IPAM store,
// registry), unmounted at cleanup. For tests of concurrency rather than of
// the disk: on ext4 a link or rename under the IPAM lock can wait tens of
// seconds for a journal commit that flushes other processes' writeback
// (the Go linker's test binaries in a parallel package), and every other
// ADD of the node then waits behind that lock.
func (n *Node) OnTmpfs(t testing.TB) {
	t.Helper()
	if err := unix.Mount("qoscni-test", n.Dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0700,size=256m"); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", n.Dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(n.Dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", n.Dir, err)
		}
	})
}

// NewPod creates a pod namespace beside the node.
func (n *Node) NewPod(t testing.TB) *NS { return NewNS(t, "qp") }

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// PluginBinary builds cmd/qoscni once per test process.
func PluginBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		// The binary outlives every test of the process (no cleanup can run
		// at its exit): its directory names the process, and the ones of
		// processes that are gone are removed here.
		removeStaleBinDirs()
		dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", binDirPrefix, os.Getpid()))
		if err != nil {
			buildErr = err
			return
		}
		buildPath = filepath.Join(dir, "qoscni")
		// Built as `make build` builds it (static), so tests run the shipped shape.
		cmd := exec.Command("go", "build", "-trimpath", "-o", buildPath, "./cmd/qoscni")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/qoscni: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

const binDirPrefix = "qoscni-bin-"

// removeStaleBinDirs removes the plugin build directories of test
// processes that no longer run (qoscni-bin-<pid>-<random>).
func removeStaleBinDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), binDirPrefix+"*"))
	for _, d := range dirs {
		rest := strings.TrimPrefix(filepath.Base(d), binDirPrefix)
		pid, err := strconv.Atoi(rest[:max(strings.IndexByte(rest, '-'), 0)])
		if err != nil || pid <= 0 {
			// The old naming, without a PID: from a finished run.
			if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > time.Hour {
				_ = os.RemoveAll(d)
			}
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			_ = os.RemoveAll(d)
		}
	}
}

// Call is one plugin invocation.
type Call struct {
	Command     string
	ContainerID string
	Netns       string
	IfName      string
	Args        string
	Path        string // CNI_PATH; defaults to the binary's directory
	Config      []byte
	Env         []string // extra or overriding variables; "CNI_X=" unsets-by-empty
	// ReadOnlyProcSys runs the plugin in a mount namespace of its own
	// where /proc/sys is read only, as runtimes give it to a container:
	// the node's sysctls can be read there but not set.
	ReadOnlyProcSys bool
}

// registryEnv mirrors state.RegistryEnv (testnet imports no product code).
const registryEnv = "QOSCNI_STATE_REGISTRY"

// Result is what the plugin printed and how it ended.
type Result struct {
	Stdout []byte
	Stderr []byte
	Err    *types.Error // decoded from stdout when the plugin failed
	Failed bool
}

// Invoke runs the plugin binary inside the node namespace.
func (n *Node) Invoke(t testing.TB, c Call) Result {
	t.Helper()
	bin := PluginBinary(t)
	env := []string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=" + c.Command, registryEnv + "=" + n.Registry}
	set := func(k, v string) {
		if v != "" {
			env = append(env, k+"="+v)
		}
	}
	set("CNI_CONTAINERID", c.ContainerID)
	set("CNI_NETNS", c.Netns)
	set("CNI_IFNAME", c.IfName)
	set("CNI_ARGS", c.Args)
	path := c.Path
	if path == "" {
		path = filepath.Dir(bin)
	}
	set("CNI_PATH", path)
	env = append(env, c.Env...)
	cmd := exec.Command("ip", "netns", "exec", n.Name, bin)
	if c.ReadOnlyProcSys {
		// ip netns exec makes its own mount namespace from this one, and
		// keeps /proc as it finds it.
		cmd = exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-ec",
			`mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys; exec "$@"`,
			"sh", "ip", "netns", "exec", n.Name, bin)
	}
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(c.Config)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
	if err != nil {
		res.Failed = true
		e := &types.Error{}
		if jerr := json.Unmarshal(stdout.Bytes(), e); jerr == nil && (e.Code != 0 || e.Msg != "") {
			res.Err = e
		} else {
			res.Err = &types.Error{Code: 999, Msg: fmt.Sprintf("plugin exited %v; stdout %q stderr %q", err, stdout.String(), stderr.String())}
		}
	}
	return res
}

// MustSucceed fails the test when the call failed.
func (r Result) MustSucceed(t testing.TB, what string) Result {
	t.Helper()
	if r.Failed {
		t.Fatalf("%s failed: code %d: %s (%s)\nstderr: %s", what, r.Err.Code, r.Err.Msg, r.Err.Details, r.Stderr)
	}
	return r
}

// StartIperf3 runs an iperf3 server inside ns until the test ends.
func StartIperf3(t testing.TB, ns *NS) {
	t.Helper()
	if _, err := exec.LookPath("iperf3"); err != nil {
		msg := "iperf3 not installed (apt-get install iperf3)"
		if os.Getenv(RequireRootEnv) != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "iperf3", "-s", "--bind", "0.0.0.0")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start iperf3 server: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// Wait until it listens.
	for i := 0; i < 100; i++ {
		if out, err := ns.Try("ss", "-ltn", "sport = :5201"); err == nil && strings.Contains(out, "5201") {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("iperf3 server did not start")
}

// Iperf3Refused says whether an iperf3 client's output is a refused
// connect: the server takes a moment to be ready for the next test after one
// ends, and a client right behind it is refused as busy, reset or not
// listening. Callers retry those; any other failure is the test's.
func Iperf3Refused(out string) bool {
	return strings.Contains(out, "unable to connect to server") ||
		strings.Contains(out, "the server is busy") ||
		strings.Contains(out, "unable to receive control message")
}

// Iperf3Retry runs an iperf3 client (run returns its output, stdout and
// stderr as the caller has them) until it is not refused, at most 4 times,
// 1 s apart, and returns the last run's output and error.
func Iperf3Retry(t testing.TB, server string, run func() (string, error)) (string, error) {
	t.Helper()
	for try := 1; ; try++ {
		out, err := run()
		if try == 4 || !Iperf3Refused(out) {
			return out, err
		}
		t.Logf("iperf3 to %s, try %d refused; again in 1 s", server, try)
		time.Sleep(time.Second)
	}
}

// Iperf3Rate runs a client in ns against server for secs seconds and
// returns the goodput the receiver saw in bit/s. reverse makes the server
// send.
func Iperf3Rate(t testing.TB, ns *NS, server string, secs int, reverse bool) float64 {
	t.Helper()
	// The first second (slow start, the token bucket's burst) is left out.
	args := []string{"netns", "exec", ns.Name, "iperf3", "-c", server, "-t", fmt.Sprint(secs), "-O", "1", "-J"}
	if reverse {
		args = append(args, "-R")
	}
	o, err := Iperf3Retry(t, server, func() (string, error) {
		out, err := exec.Command("ip", args...).Output()
		return string(out), err
	})
	out := []byte(o)
	if err != nil {
		t.Fatalf("iperf3 client: %v: %s", err, out)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &r); err != nil || r.Error != "" {
		t.Fatalf("iperf3 output: %v %s", err, r.Error)
	}
	return r.End.SumReceived.BitsPerSecond
}
