package install

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"golang.org/x/sys/unix"
)

// fakeKernel stands for the module system calls: it records what it was
// handed, in order, and answers as a kernel would.
type fakeKernel struct {
	t *testing.T
	// decompresses: finit_module takes MODULE_INIT_COMPRESSED_FILE (5.17+
	// with CONFIG_MODULE_DECOMPRESS); otherwise compressErr is its answer.
	decompresses bool
	compressErr  error
	loaded       map[string]bool // by module image content
	failWith     error           // every load fails so
	calls        []string        // "finit <file> <flags>" / "init <image>"
}

func (k *fakeKernel) loader(dir string) *moduleLoader {
	return &moduleLoader{dir: dir, finit: k.finit, init: k.init}
}

func (k *fakeKernel) finit(fd, flags int) error {
	path, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		k.t.Fatal(err)
	}
	k.calls = append(k.calls, fmt.Sprintf("finit %s %d", filepath.Base(path), flags))
	if k.failWith != nil {
		return k.failWith
	}
	b, err := os.ReadFile(path)
	if err != nil {
		k.t.Fatal(err)
	}
	if flags&unix.MODULE_INIT_COMPRESSED_FILE != 0 {
		if !k.decompresses {
			return k.compressErr
		}
		c := compression(path)
		if b, err = decompress(bytes.NewReader(b), c); err != nil {
			k.t.Fatalf("kernel decompression of %s: %v", path, err)
		}
	}
	return k.load(b)
}

func (k *fakeKernel) init(image []byte) error {
	k.calls = append(k.calls, "init "+string(image))
	return k.load(image)
}

func (k *fakeKernel) load(image []byte) error {
	if !bytes.HasPrefix(image, []byte("\x7fELF ")) {
		return unix.ENOEXEC
	}
	if k.loaded[string(image)] {
		return unix.EEXIST
	}
	if k.loaded == nil {
		k.loaded = map[string]bool{}
	}
	k.loaded[string(image)] = true
	return nil
}

// modulesDir is a /lib/modules/<release> with br_netfilter and its
// dependencies, each in another compression, and a module named with '-'.
func modulesDir(t *testing.T, depLines ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "lib", "modules", "6.1.0-test")
	files := map[string]string{
		"kernel/net/bridge/br_netfilter.ko.xz": "br_netfilter",
		"kernel/net/bridge/bridge.ko.zst":      "bridge",
		"kernel/net/802/stp.ko.gz":             "stp",
		"kernel/net/llc/llc.ko":                "llc",
		"kernel/drivers/net/foo-bar.ko":        "foo_bar",
	}
	for f, name := range files {
		var buf bytes.Buffer
		image := []byte("\x7fELF " + name)
		var w interface {
			Write([]byte) (int, error)
			Close() error
		}
		var err error
		switch compression(f) {
		case "xz":
			w, err = xz.NewWriter(&buf)
		case "zst":
			w, err = zstd.NewWriter(&buf)
		case "gz":
			w = gzip.NewWriter(&buf)
		default:
			buf.Write(image)
		}
		if err != nil {
			t.Fatal(err)
		}
		if w != nil {
			if _, err := w.Write(image); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
		}
		p := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if depLines == nil {
		depLines = []string{
			"kernel/net/llc/llc.ko:",
			"kernel/net/802/stp.ko.gz: kernel/net/llc/llc.ko",
			"kernel/net/bridge/bridge.ko.zst: kernel/net/802/stp.ko.gz kernel/net/llc/llc.ko",
			"kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.zst kernel/net/802/stp.ko.gz kernel/net/llc/llc.ko",
			"kernel/drivers/net/foo-bar.ko:",
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(strings.Join(depLines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

var brnfFiles = []string{"kernel/net/llc/llc.ko", "kernel/net/802/stp.ko.gz", "kernel/net/bridge/bridge.ko.zst", "kernel/net/bridge/br_netfilter.ko.xz"}

// Dependencies first, from the end of modules.dep's list, each file
// handed to the kernel to decompress, as modprobe would.
func TestLoadModuleKernelDecompresses(t *testing.T) {
	k := &fakeKernel{t: t, decompresses: true}
	loaded, err := k.loader(modulesDir(t)).load("br_netfilter")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(loaded, brnfFiles) {
		t.Errorf("loaded %v, want %v", loaded, brnfFiles)
	}
	want := []string{"finit llc.ko 0", "finit stp.ko.gz 4", "finit bridge.ko.zst 4", "finit br_netfilter.ko.xz 4"}
	if !slices.Equal(k.calls, want) {
		t.Errorf("calls %q, want %q", k.calls, want)
	}
}

// A kernel that cannot decompress (before 5.17: EINVAL for the unknown
// flag; without CONFIG_MODULE_DECOMPRESS: EOPNOTSUPP) gets the image
// decompressed here, for each of xz, zstd and gzip.
func TestLoadModuleDecompressedHere(t *testing.T) {
	for _, kerr := range []error{unix.EINVAL, unix.EOPNOTSUPP} {
		t.Run(kerr.Error(), func(t *testing.T) {
			k := &fakeKernel{t: t, compressErr: kerr}
			loaded, err := k.loader(modulesDir(t)).load("br_netfilter")
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(loaded, brnfFiles) {
				t.Errorf("loaded %v, want %v", loaded, brnfFiles)
			}
			want := []string{"finit llc.ko 0", "finit stp.ko.gz 4", "init \x7fELF stp", "finit bridge.ko.zst 4", "init \x7fELF bridge",
				"finit br_netfilter.ko.xz 4", "init \x7fELF br_netfilter"}
			if !slices.Equal(k.calls, want) {
				t.Errorf("calls %q, want %q", k.calls, want)
			}
		})
	}
}

// What is loaded already (the bridge, for Docker's or another CNI's
// bridge) is no error and not reported as loaded.
func TestLoadModuleAlreadyLoaded(t *testing.T) {
	k := &fakeKernel{t: t, decompresses: true, loaded: map[string]bool{"\x7fELF llc": true, "\x7fELF stp": true, "\x7fELF bridge": true}}
	loaded, err := k.loader(modulesDir(t)).load("br_netfilter")
	if err != nil {
		t.Fatal(err)
	}
	if want := brnfFiles[3:]; !slices.Equal(loaded, want) {
		t.Errorf("loaded %v, want %v", loaded, want)
	}
	loaded, err = k.loader(modulesDir(t)).load("br_netfilter")
	if err != nil || len(loaded) != 0 {
		t.Errorf("second load: %v, %v; want nothing loaded and no error", loaded, err)
	}
}

func TestLoadModuleNames(t *testing.T) {
	k := &fakeKernel{t: t, decompresses: true}
	dir := modulesDir(t)
	// '-' and '_' are one character to modprobe and the kernel.
	if loaded, err := k.loader(dir).load("foo-bar"); err != nil || len(loaded) != 1 {
		t.Errorf("foo-bar: %v, %v", loaded, err)
	}
	// Absolute paths of older depmods name the node's /lib/modules.
	abs := modulesDir(t, "/lib/modules/6.1.0-test/kernel/net/llc/llc.ko:")
	if loaded, err := k.loader(abs).load("llc"); err != nil || !slices.Equal(loaded, []string{"/lib/modules/6.1.0-test/kernel/net/llc/llc.ko"}) {
		t.Errorf("absolute path: %v, %v", loaded, err)
	}
}

// Each failure says what it was and what it means.
func TestLoadModuleErrors(t *testing.T) {
	dir := modulesDir(t)
	for _, c := range []struct {
		name   string
		dir    string
		module string
		kernel *fakeKernel
		want   []string
	}{
		{"no such module", dir, "br_nope", &fakeKernel{t: t}, []string{"br_nope", "not in", "modules.dep", "6.1.0-test"}},
		{"no modules.dep", filepath.Join(t.TempDir(), "6.1.0-none"), "br_netfilter", &fakeKernel{t: t},
			[]string{"find module br_netfilter", "no such file", "/lib/modules mounted", "6.1.0-none"}},
		{"kernel without modules", dir, "br_netfilter", &fakeKernel{t: t, failWith: unix.ENOSYS},
			[]string{"load module llc", "llc.ko", "cannot load modules"}},
		{"no permission", dir, "br_netfilter", &fakeKernel{t: t, failWith: unix.EPERM},
			[]string{"load module llc", "CAP_SYS_MODULE", "modules_disabled"}},
		{"signature", dir, "br_netfilter", &fakeKernel{t: t, failWith: unix.EKEYREJECTED}, []string{"signature"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := c.kernel.loader(c.dir).load(c.module)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not say %q: %v", w, err)
				}
			}
			t.Log(err)
		})
	}
	// Built in: modules.builtin names it, modules.dep does not.
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/net/bridge/br_vlan.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := (&fakeKernel{t: t}).loader(dir).load("br_vlan")
	if err == nil || !strings.Contains(err.Error(), "built into") {
		t.Errorf("built-in module: %v", err)
	}
	// A corrupt compressed file fails in decompression, not later.
	if err := os.WriteFile(filepath.Join(dir, brnfFiles[3]), []byte("not xz"), 0o644); err != nil {
		t.Fatal(err)
	}
	k := &fakeKernel{t: t, compressErr: unix.EOPNOTSUPP}
	if _, err := k.loader(dir).load("br_netfilter"); err == nil || !strings.Contains(err.Error(), "decompress") {
		t.Errorf("corrupt module: %v", err)
	}
}

// The real system call, with a file that is no module: whatever the
// kernel (ENOSYS without module support, EPERM without CAP_SYS_MODULE,
// ENOEXEC or EINVAL for the content), it refuses, and nothing is loaded.
func TestModuleSyscall(t *testing.T) {
	l, err := newModuleLoader(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "empty.ko"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = l.finit(int(f.Fd()), 0)
	if err == nil {
		t.Fatal("finit_module of an empty file succeeded")
	}
	var errno unix.Errno
	if !errors.As(err, &errno) {
		t.Errorf("not an errno: %v", err)
	}
	t.Logf("finit_module of an empty file: %v", explainLoadError(err))
}
