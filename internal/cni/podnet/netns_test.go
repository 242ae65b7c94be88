package podnet

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// OpenNetNS only opens and inspects: the process's own namespaces serve
// without root and without changing anything.
func TestOpenNetNSKinds(t *testing.T) {
	ns, err := OpenNetNS("/proc/self/ns/net")
	if err != nil {
		t.Fatalf("own network namespace: %v", err)
	}
	ns.Close()

	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/proc/self/ns/mnt", "/proc/self/ns/uts", "/proc/self/ns/ipc", "/proc/self/ns/user", "/proc/self/ns/cgroup", file, t.TempDir()} {
		if _, err := os.Stat(path); err != nil {
			continue // a kernel without that namespace type
		}
		ns, err := OpenNetNS(path)
		if err == nil {
			ns.Close()
			t.Errorf("%s opened as a network namespace", path)
			continue
		}
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrInvalidNetNS || !strings.Contains(te.Msg, path) {
			t.Errorf("%s: want CNI error %d naming the path, got %v", path, types.ErrInvalidNetNS, err)
		}
		t.Logf("%s: %v", path, err)
	}
	if _, err := OpenNetNS("/proc/self/ns/nonexistent"); !errors.Is(err, ErrNetNSGone) {
		t.Errorf("missing path: want ErrNetNSGone, got %v", err)
	}
}
