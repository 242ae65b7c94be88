package ipam

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// newSharedConfig returns a config every simulated plugin process builds on its own.
func newSharedConfig(t testing.TB, dataDir string) *Config {
	c := decodeTB(t, `{"ranges":[[{"subnet":"10.22.0.0/22"}],[{"subnet":"fd00::/64"}]]}`)
	c.DataDir = dataDir
	return c
}

func decodeTB(t testing.TB, js string) *Config {
	t.Helper()
	var c Config
	if err := c.UnmarshalJSON([]byte(js)); err != nil {
		t.Fatal(err)
	}
	return &c
}

func checkUnique(t *testing.T, got map[string]string) {
	t.Helper()
	seen := map[string]string{}
	for owner, addrs := range got {
		for _, ip := range strings.Fields(addrs) {
			if prev, dup := seen[ip]; dup {
				t.Errorf("%s handed to %s and %s", ip, prev, owner)
			}
			seen[ip] = owner
		}
	}
}

func TestConcurrentAllocators(t *testing.T) {
	dir := t.TempDir()
	const workers, perWorker = 50, 4
	var mu sync.Mutex
	got := map[string]string{}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			// One Allocator per goroutine, as each plugin process has its own.
			a, err := New(newSharedConfig(t, dir), "net1")
			if err != nil {
				t.Error(err)
				return
			}
			for i := range perWorker {
				id := fmt.Sprintf("w%d-%d", w, i)
				cfgs, err := a.Allocate(id, "eth0")
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				got[id] = strings.Join(addrs(cfgs), " ")
				mu.Unlock()
				if i%2 == 1 {
					// Churn: release half so that concurrent allocations also race with releases.
					if err := a.Release(id, "eth0"); err != nil {
						t.Error(err)
					}
					mu.Lock()
					delete(got, id)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if len(got) != workers*perWorker/2 {
		t.Fatalf("%d attachments hold addresses, want %d", len(got), workers*perWorker/2)
	}
	checkUnique(t, got)
	a, _ := New(newSharedConfig(t, dir), "net1")
	u, _ := a.Usage()
	if u[0].Used != uint64(len(got)) || u[1].Used != uint64(len(got)) {
		t.Errorf("usage %+v, want %d per set", u, len(got))
	}
}

// TestHelperProcess is the body of the child processes of TestConcurrentProcesses.
func TestHelperProcess(t *testing.T) {
	dir := os.Getenv("QOSCNI_IPAM_HELPER_DIR")
	if dir == "" {
		t.Skip("helper for TestConcurrentProcesses")
	}
	a, err := New(newSharedConfig(t, dir), "net1")
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	for i := range 10 {
		id := fmt.Sprintf("p%d-%s", os.Getpid(), fmt.Sprint(i))
		cfgs, err := a.Allocate(id, "eth0")
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		fmt.Println("OK", id, strings.Join(addrs(cfgs), " "))
	}
	os.Exit(0)
}

func TestConcurrentProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	dir := t.TempDir()
	const procs = 8
	outs := make([]bytes.Buffer, procs)
	cmds := make([]*exec.Cmd, procs)
	for i := range procs {
		cmds[i] = exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
		cmds[i].Env = append(os.Environ(), "QOSCNI_IPAM_HELPER_DIR="+dir)
		cmds[i].Stdout = &outs[i]
		cmds[i].Stderr = &outs[i]
		if err := cmds[i].Start(); err != nil {
			t.Fatal(err)
		}
	}
	got := map[string]string{}
	for i, c := range cmds {
		err := c.Wait()
		sc := bufio.NewScanner(&outs[i])
		for sc.Scan() {
			f := strings.SplitN(sc.Text(), " ", 3)
			if f[0] == "OK" && len(f) == 3 {
				got[f[1]] = f[2]
			} else if f[0] == "ERR" {
				t.Errorf("child %d: %s", i, sc.Text())
			}
		}
		if err != nil {
			t.Errorf("child %d: %v", i, err)
		}
	}
	if len(got) != procs*10 {
		t.Fatalf("%d allocations reported, want %d", len(got), procs*10)
	}
	checkUnique(t, got)
}
