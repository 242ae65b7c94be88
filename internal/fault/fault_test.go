package fault_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// A helper binary built with and without the tag: only the tagged one dies,
// and only at the named point's n-th visit.
func TestAt(t *testing.T) {
	dir := t.TempDir()
	build := func(tags ...string) string {
		out := filepath.Join(dir, "prog"+map[bool]string{true: "-tag", false: ""}[len(tags) > 0])
		args := append([]string{"build", "-o", out}, tags...)
		cmd := exec.Command("go", append(args, "./testdata/prog")...)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, b)
		}
		return out
	}
	release, tagged := build(), build("-tags", "faultinject")
	run := func(bin, env string) (string, bool) {
		cmd := exec.Command(bin)
		cmd.Env = append(os.Environ(), "QOSCNI_FAULT="+env)
		out, err := cmd.Output()
		var ee *exec.ExitError
		killed := errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL
		return string(out), killed
	}
	for _, c := range []struct {
		bin, env, out string
		killed        bool
	}{
		{release, "ADD:veth", "passed 1\npassed 2\npassed 3\n", false},
		{tagged, "ADD:veth", "", true},
		{tagged, "ADD:veth@2", "passed 1\n", true},
		{tagged, "ADD:ipam", "passed 1\npassed 2\npassed 3\n", false},
		{tagged, "", "passed 1\npassed 2\npassed 3\n", false},
	} {
		out, killed := run(c.bin, c.env)
		if out != c.out || killed != c.killed {
			t.Errorf("%s with %q: output %q killed %v, want %q %v", filepath.Base(c.bin), c.env, out, killed, c.out, c.killed)
		}
	}
}
