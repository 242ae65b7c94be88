package node

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ShowLogsEnv, when set, shows a stopped process's last log lines also
// when the test passed (they always show when it failed).
const ShowLogsEnv = "QOSCNI_E2E_LOGS"

// Spawner starts processes from one OS thread that lives until the test
// ends, so that their parent-death signal (SIGKILL) fires when the test
// binary dies without running its cleanups (a panic, a go test timeout)
// and not earlier: the signal follows the thread that forked, and Go may
// retire other threads at any time.
type Spawner struct {
	reqs chan func()
}

// NewSpawner starts the spawning thread; it ends after the test's other
// cleanups (registered first, so run last).
func NewSpawner(t testing.TB) *Spawner {
	s := &Spawner{reqs: make(chan func())}
	go func() {
		runtime.LockOSThread()
		// Returning while locked ends the thread: by then every process
		// was stopped, and one that was not gets its SIGKILL.
		for f := range s.reqs {
			f()
		}
	}()
	t.Cleanup(func() { close(s.reqs) })
	return s
}

// Process is one running binary whose output goes to a log file.
type Process struct {
	Name string
	Log  string
	Cmd  *exec.Cmd
	// Done is closed when the process has exited; Err is then its end.
	Done chan struct{}
	Err  error
	once sync.Once
}

// Start runs bin with args, its stdout and stderr appended to logPath.
func (s *Spawner) Start(name, logPath, bin string, args ...string) (*Process, error) {
	return s.StartEnv(name, logPath, nil, bin, args...)
}

// StartEnv is Start with extra environment variables.
func (s *Spawner) StartEnv(name, logPath string, env []string, bin string, args ...string) (*Process, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the child has its own copy
	fmt.Fprintf(f, "--- %s %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	errc := make(chan error)
	s.reqs <- func() { errc <- cmd.Start() }
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	p := &Process{Name: name, Log: logPath, Cmd: cmd, Done: make(chan struct{})}
	go func() { p.Err = cmd.Wait(); close(p.Done) }()
	return p, nil
}

// Stop ends the process by its PID: SIGTERM, then SIGKILL after timeout.
// On a failed test (or with QOSCNI_E2E_LOGS) it logs the last lines of the
// process's log, and keeps the log (KeepLog).
func (p *Process) Stop(t testing.TB, timeout time.Duration) {
	p.once.Do(func() {
		select {
		case <-p.Done:
		default:
			_ = p.Cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.Done:
			case <-time.After(timeout):
				t.Logf("%s (pid %d) ignored SIGTERM for %v; killing it", p.Name, p.Cmd.Process.Pid, timeout)
				_ = p.Cmd.Process.Kill()
				<-p.Done
			}
		}
		if t.Failed() || os.Getenv(ShowLogsEnv) != "" {
			t.Logf("last lines of %s:\n%s", p.Log, Tail(p.Log))
		}
		KeepLog(t, p.Log)
	})
}

// Tail is the end (60 lines) of a log file.
func Tail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > 60 {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}
