package hostile_test

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/agent"
	"github.com/qoscni/qoscni/internal/journal"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/reliability/reltest"
)

// TestFilesPrivate: after ADD, CHECK and GC of a shaped pod with a
// hostPort, run under umask 000 so that only the plugin's own modes count,
// every directory under the state, IPAM and journal roots is 0700 and
// every file 0600, owned by root, and nothing else (no symlink, fifo...)
// is there.
func TestFilesPrivate(t *testing.T) {
	n := testnet.NewNode(t)
	_ = testnet.PluginBinary(t)
	pod := n.NewPod(t)
	conf := hostileNet.ConfWith(n, shapedPorts(9201))
	o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: "perm", Netns: pod.Path, IfName: "eth0", Args: podArgs("perm"), Config: conf, Umask0: true}, callLimit)
	mustOK(t, "ADD", o)
	mustOK(t, "CHECK", reltest.Invoke(t, n, reltest.Call{Command: "CHECK", ContainerID: "perm", Netns: pod.Path, IfName: "eth0", Config: reltest.WithPrev(conf, o.Stdout), Umask0: true}, callLimit))
	mustOK(t, "GC", reltest.Invoke(t, n, reltest.Call{Command: "GC", Config: hostileNet.GCConf(n, "perm/eth0"), Umask0: true}, callLimit))
	t.Cleanup(func() {
		_ = reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "perm", Netns: pod.Path, IfName: "eth0", Config: conf}, callLimit)
	})
	var files, dirs int
	for _, root := range []string{n.StateDir, n.IPAMDir, journal.DirFor(n.StateDir)} {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			info, err := os.Lstat(p)
			if err != nil {
				return err
			}
			st := info.Sys().(*syscall.Stat_t)
			if st.Uid != 0 || st.Gid != 0 {
				t.Errorf("%s owned by %d:%d", p, st.Uid, st.Gid)
			}
			switch m := info.Mode(); {
			case m.IsDir():
				dirs++
				if m.Perm() != 0o700 {
					t.Errorf("directory %s has mode %v, want 0700", p, m.Perm())
				}
			case m.IsRegular():
				files++
				if m.Perm() != 0o600 {
					t.Errorf("file %s has mode %v, want 0600", p, m.Perm())
				}
			default:
				t.Errorf("%s is a %v", p, m.Type())
			}
			return nil
		})
		if err != nil {
			t.Fatalf("walk %s: %v", root, err)
		}
	}
	t.Logf("%d directories and %d files checked", dirs, files)
	if files < 6 || dirs < 5 {
		t.Errorf("only %d files and %d directories: the walk missed the stores", files, dirs)
	}
}

// inNetns runs fn on a thread switched into the namespace at path;
// sockets fn creates stay in that namespace. A thread that cannot switch
// back stays locked and dies with its goroutine.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(path)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		ferr := fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// nsClient is an HTTP client whose connections start in the namespace.
func nsClient(path string) *http.Client {
	return &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := inNetns(path, func() (err error) {
					c, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
}

// connRefused reports whether a TCP connection to addr from the namespace is
// refused (nothing listens there).
func connRefused(path, addr string) (bool, error) {
	err := inNetns(path, func() error {
		c, err := net.DialTimeout("tcp", addr, 3*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	return errors.Is(err, syscall.ECONNREFUSED), err
}

// listeners returns the TCP listening sockets of the namespace.
func listeners(t *testing.T, n *testnet.Node) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(n.Exec(t, "ss", "-Hltn"), "\n") {
		if f := strings.Fields(l); len(f) >= 4 {
			out = append(out, f[3])
		}
	}
	return out
}

// checkEndpoints: /metrics, /healthz and /readyz answer; nothing else does
// (no pprof, no expvar, no index), and the metrics path takes only GET.
func checkEndpoints(t *testing.T, nsPath, addr string) {
	t.Helper()
	c := nsClient(nsPath)
	get := func(method, path string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+addr+path, nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return resp.StatusCode, string(b)
	}
	if code, body := get("GET", "/metrics"); code != 200 || !strings.Contains(body, "qoscni_") {
		t.Errorf("GET /metrics: %d, qoscni series present: %v", code, strings.Contains(body, "qoscni_"))
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, body := get("GET", p); code != 200 || strings.TrimSpace(body) != "ok" {
			t.Errorf("GET %s: %d %q", p, code, body)
		}
	}
	for _, p := range []string{"/", "/debug/pprof/", "/debug/pprof/cmdline", "/debug/pprof/goroutine", "/debug/vars",
		"/metrics/../debug/pprof/", "/healthz/x", "/state", "/favicon.ico"} {
		if code, _ := get("GET", p); code != 404 {
			t.Errorf("GET %s: %d, want 404", p, code)
		}
	}
	for _, m := range []string{"POST", "PUT", "DELETE"} {
		if code, _ := get(m, "/metrics"); code != 405 {
			t.Errorf("%s /metrics: %d, want 405", m, code)
		}
	}
}

// TestAgentEndpoint starts the agent's server (agent.New) inside a fresh
// node namespace on 127.0.0.2 and checks what it serves and where it
// listens: the configured address only, nothing on 127.0.0.1 or any other
// address.
func TestAgentEndpoint(t *testing.T) {
	n := testnet.NewNode(t)
	var srv *agent.Server
	err := inNetns(n.Path, func() (err error) {
		srv, err = agent.New(agent.Config{Listen: "127.0.0.2:0", StateDir: n.StateDir, JournalDir: journal.DirFor(n.StateDir),
			CNIConfDir: t.TempDir(), NetnsPath: n.Path, Version: "test", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	addr := srv.Addr()
	_, port, _ := net.SplitHostPort(addr)
	checkEndpoints(t, n.Path, addr)
	if ls := listeners(t, n); len(ls) != 1 || ls[0] != addr {
		t.Errorf("listening sockets in the node: %v, want only %s", ls, addr)
	}
	for _, other := range []string{"127.0.0.1:" + port, "[::1]:" + port} {
		if ok, err := connRefused(n.Path, other); !ok {
			t.Errorf("connect to %s: %v, want connection refused", other, err)
		}
	}
}

// TestAgentListenConfig runs the built agent binary in the node namespace
// and checks that --listen and QOSCNI_AGENT_LISTEN choose the one address
// it binds.
func TestAgentListenConfig(t *testing.T) {
	n := testnet.NewNode(t)
	bin := filepath.Join(t.TempDir(), "qoscni-agent")
	_, file, _, _ := runtime.Caller(0)
	build := exec.Command("go", "build", "-trimpath", "-o", bin, "./cmd/qoscni-agent")
	build.Dir = filepath.Join(filepath.Dir(file), "..", "..", "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/qoscni-agent: %v\n%s", err, out)
	}
	for _, c := range []struct {
		name, addr string
		flag       bool
	}{{"flag", "127.0.0.3:19743", true}, {"env", "127.0.0.4:19744", false}} {
		t.Run(c.name, func(t *testing.T) {
			args := []string{"netns", "exec", n.Name, bin, "serve", "--state-dir", n.StateDir, "--journal-dir", journal.DirFor(n.StateDir),
				"--cni-conf-dir", t.TempDir(), "--state-registry", n.Registry, "--netns", n.Path, "--log-level", "warn"}
			env := []string{"PATH=" + os.Getenv("PATH")} // no KUBECONFIG, not in a cluster: no API
			if c.flag {
				// The flag wins over the environment.
				args = append(args, "--listen", c.addr)
				env = append(env, agent.ListenEnv+"=127.0.0.9:19749")
			} else {
				env = append(env, agent.ListenEnv+"="+c.addr)
			}
			cmd := exec.Command("ip", args...)
			cmd.Env = env
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Closed when the agent has exited; waitErr is how.
			exited := make(chan struct{})
			var waitErr error
			go func() { waitErr = cmd.Wait(); close(exited) }()
			t.Cleanup(func() {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-exited:
				case <-time.After(15 * time.Second):
					_ = cmd.Process.Kill()
					<-exited
				}
			})
			var ls []string
			for i := 0; i < 300; i++ {
				if ls = listeners(t, n); len(ls) > 0 {
					break
				}
				select {
				case <-exited:
					t.Fatalf("agent exited: %v\n%s", waitErr, stderr.String())
				case <-time.After(100 * time.Millisecond):
				}
			}
			if len(ls) != 1 || ls[0] != c.addr {
				t.Fatalf("listening sockets %v, want only %s\n%s", ls, c.addr, stderr.String())
			}
			checkEndpoints(t, n.Path, c.addr)
			_, port, _ := net.SplitHostPort(c.addr)
			if ok, err := connRefused(n.Path, "127.0.0.1:"+port); !ok {
				t.Errorf("connect to 127.0.0.1:%s: %v, want connection refused", port, err)
			}
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case <-exited:
				if waitErr != nil {
					t.Errorf("agent after SIGTERM: %v\n%s", waitErr, stderr.String())
				}
			case <-time.After(15 * time.Second):
				t.Errorf("agent did not stop within 15s of SIGTERM")
			}
		})
	}
}
