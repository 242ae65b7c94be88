//go:build faultinject

package fault

import (
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Enabled says this binary has the hook.
const Enabled = true

var (
	mu     sync.Mutex
	counts = map[string]int{}
)

// At kills the process with SIGKILL (no deferred function, no cleanup:
// what the kernel's OOM killer or a node reboot does) when Env names this
// point and it is reached for the n-th time.
func At(op, step string) {
	want := os.Getenv(Env)
	if want == "" {
		return
	}
	n := 1
	if i := strings.LastIndexByte(want, '@'); i >= 0 {
		if v, err := strconv.Atoi(want[i+1:]); err == nil && v > 0 {
			n = v
		}
		want = want[:i]
	}
	point := op + ":" + step
	if point != want {
		return
	}
	mu.Lock()
	counts[point]++
	hit := counts[point] == n
	mu.Unlock()
	if hit {
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
}
