package stress_test

import (
	"bytes"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/reliability/reltest"
)

const (
	network = "qstress"
	bridge  = "qsbr0"
)

// pod is one attachment of the storm: its per-pod config carries shaping
// and hostPorts on some pods so that every locked path runs.
type pod struct {
	cid  string
	ns   *testnet.NS
	conf []byte
	args string
}

// stressNet is the standalone network of every test here; its IPv4 and
// IPv6 ranges hold far more than the 100 pods a round has live.
var stressNet = reltest.Net{Name: network, Bridge: bridge, Ranges: []map[string]any{
	{"subnet": "10.96.0.0/22"},
	{"subnet": "fd96::/64"},
}}

// invoke is reltest.Invoke with the plugin registered in procs while it
// runs, so that the lock watch can name a lock holder.
func invoke(t testing.TB, n *testnet.Node, c reltest.Call, limit time.Duration) reltest.Outcome {
	t.Helper()
	c.Started = func(pid int, stderr *bytes.Buffer) func() {
		pr := &proc{label: strings.TrimSpace(c.Command + " " + c.ContainerID), stderr: stderr, done: make(chan struct{})}
		procs.Store(pid, pr)
		return func() { close(pr.done) }
	}
	return reltest.Invoke(t, n, c, limit)
}

// proc is a running or finished plugin invocation, by PID, so that a lock
// holder seen in /proc/locks can be named.
type proc struct {
	label  string
	stderr *bytes.Buffer // read only after done is closed
	done   chan struct{}
}

var procs sync.Map // pid -> *proc

// lockWatch samples /proc/locks for the holders of the plugin's flocks and
// keeps, per lock, the longest time one process held it.
type lockWatch struct {
	inodes  map[uint64]string // inode -> lock name
	stop    chan struct{}
	done    chan struct{}
	longest map[string]holdRun
}

type holdRun struct {
	pid         int
	label       string
	first, last time.Time
	pr          *proc
}

func (h holdRun) d() time.Duration {
	if h.pid == 0 {
		return 0
	}
	return h.last.Sub(h.first) + lockSample
}

const lockSample = 20 * time.Millisecond

// watchLocks starts sampling the locks at paths (name -> path).
func watchLocks(t testing.TB, paths map[string]string) *lockWatch {
	t.Helper()
	w := &lockWatch{inodes: map[uint64]string{}, stop: make(chan struct{}), done: make(chan struct{}), longest: map[string]holdRun{}}
	for name, p := range paths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			t.Fatalf("stat %s: %v", p, err)
		}
		w.inodes[st.Ino] = name
	}
	go func() {
		defer close(w.done)
		cur := map[string]holdRun{}
		tick := time.NewTicker(lockSample)
		defer tick.Stop()
		for {
			select {
			case <-w.stop:
				return
			case now := <-tick.C:
				data, err := os.ReadFile("/proc/locks")
				if err != nil {
					continue
				}
				seen := map[string]bool{}
				for _, line := range strings.Split(string(data), "\n") {
					f := strings.Fields(line)
					if len(f) < 6 || f[1] == "->" || f[1] != "FLOCK" {
						continue
					}
					parts := strings.Split(f[5], ":")
					ino, err := strconv.ParseUint(parts[len(parts)-1], 10, 64)
					name, ok := w.inodes[ino]
					if err != nil || !ok {
						continue
					}
					pid, _ := strconv.Atoi(f[4])
					seen[name] = true
					h := cur[name]
					if h.pid != pid {
						h = holdRun{pid: pid, first: now}
						if v, ok := procs.Load(pid); ok {
							h.pr = v.(*proc)
							h.label = h.pr.label
						} else {
							h.label = fmt.Sprintf("pid %d (not a plugin call of this test)", pid)
						}
					}
					h.last = now
					cur[name] = h
					if h.d() > w.longest[name].d() {
						w.longest[name] = h
					}
				}
				for name := range cur {
					if !seen[name] {
						delete(cur, name)
					}
				}
			}
		}
	}()
	return w
}

// end stops sampling and describes the longest hold of each lock; for a
// hold longer than slow it adds the holder's debug log (step timings).
func (w *lockWatch) end(slow time.Duration) string {
	close(w.stop)
	<-w.done
	var names []string
	for _, n := range w.inodes {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []string
	for _, n := range names {
		h := w.longest[n]
		if h.pid == 0 {
			out = append(out, n+" lock: never seen held")
			continue
		}
		s := fmt.Sprintf("%s lock: longest hold ~%v by %s", n, h.d().Round(10*time.Millisecond), h.label)
		if h.d() > slow && h.pr != nil {
			select {
			case <-h.pr.done:
				s += fmt.Sprintf(" (its log: %q)", strings.TrimSpace(h.pr.stderr.String()))
			case <-time.After(time.Second):
			}
		}
		out = append(out, s)
	}
	return strings.Join(out, "; ")
}
