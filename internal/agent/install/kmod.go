package install

import (
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"golang.org/x/sys/unix"
)

// Loading a kernel module without modprobe. The DaemonSet's image has no
// modprobe, and the host's is a dynamically linked program with its
// configuration under /etc: running it would mean mounting the host's
// root and chrooting into it. What modprobe does for one named module is
// small: find its file and those it depends on in modules.dep, and hand
// each to the kernel, dependencies first. finit_module(2) takes a file
// descriptor, so the kernel reads the file itself (and checks its
// signature as for modprobe); a compressed one it decompresses itself
// since Linux 5.17 when built for it, and here otherwise (init_module(2)).
// Module options and softdeps of modprobe.d are not read: br_netfilter
// and its dependencies have none that matter.

// maxModuleSize bounds a decompressed module in memory: the install
// container's memory limit is 64 MiB, and the modules loaded here are
// well below 1 MiB.
const maxModuleSize = 32 << 20

// moduleLoader loads modules from one kernel's module directory.
type moduleLoader struct {
	// dir is /lib/modules/<kernel release>, as this process sees it.
	dir string
	// finit and init are the system calls (tests replace them).
	finit func(fd, flags int) error
	init  func(image []byte) error
}

// newModuleLoader is the loader of the running kernel, its modules under
// modulesDir (the node's /lib/modules).
func newModuleLoader(modulesDir string) (*moduleLoader, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return nil, fmt.Errorf("uname: %w", err)
	}
	return &moduleLoader{
		dir:   filepath.Join(modulesDir, unix.ByteSliceToString(u.Release[:])),
		finit: func(fd, flags int) error { return unix.FinitModule(fd, "", flags) },
		init:  func(image []byte) error { return unix.InitModule(image, "") },
	}, nil
}

// moduleName is the name of a module file, with '-' read as '_' as the
// kernel and modprobe read it.
func moduleName(file string) string {
	base := filepath.Base(file)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// load loads the module name after the modules it depends on, and returns
// the files it loaded (relative to the module directory); those already
// loaded are not in it.
func (l *moduleLoader) load(name string) (loaded []string, err error) {
	files, err := l.files(name)
	if err != nil {
		return nil, err
	}
	for _, f := range files {
		switch err := l.loadFile(f); {
		case err == nil:
			loaded = append(loaded, f)
		case errors.Is(err, unix.EEXIST):
		default:
			return loaded, fmt.Errorf("load module %s (%s): %w", moduleName(f), filepath.Join(l.dir, f), explainLoadError(err))
		}
	}
	return loaded, nil
}

// files returns the module's file and those of its dependencies, in the
// order to load them. modules.dep lists a module's dependencies each
// before the ones it depends on, so modprobe loads them from the last.
func (l *moduleLoader) files(name string) ([]string, error) {
	name = strings.ReplaceAll(name, "-", "_")
	depPath := filepath.Join(l.dir, "modules.dep")
	f, err := os.Open(depPath)
	if err != nil {
		return nil, fmt.Errorf("find module %s: %w (are the node's /lib/modules mounted, and are there modules for kernel %s?)",
			name, err, filepath.Base(l.dir))
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		file, deps, ok := strings.Cut(sc.Text(), ":")
		if !ok || moduleName(file) != name {
			continue
		}
		out := strings.Fields(deps)
		slices.Reverse(out)
		return append(out, file), nil
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", depPath, err)
	}
	if l.builtin(name) {
		return nil, fmt.Errorf("module %s is built into kernel %s (modules.builtin), yet not active here", name, filepath.Base(l.dir))
	}
	return nil, fmt.Errorf("module %s is not in %s: kernel %s has no such module", name, depPath, filepath.Base(l.dir))
}

// builtin reports whether modules.builtin lists name.
func (l *moduleLoader) builtin(name string) bool {
	b, err := os.ReadFile(filepath.Join(l.dir, "modules.builtin"))
	if err != nil {
		return false
	}
	return slices.ContainsFunc(strings.Fields(string(b)), func(f string) bool { return moduleName(f) == name })
}

// loadFile hands one module file to the kernel. file is relative to the
// module directory, as kmod's depmod writes modules.dep; the absolute
// /lib/modules/... of older depmods is the node's, so it is looked up
// under the directory the node's /lib/modules is seen at.
func (l *moduleLoader) loadFile(file string) error {
	path := filepath.Join(l.dir, file)
	if rest, ok := strings.CutPrefix(file, "/lib/modules/"); ok {
		path = filepath.Join(filepath.Dir(l.dir), rest)
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	comp := compression(file)
	if comp == "" {
		return l.finit(int(f.Fd()), 0)
	}
	err = l.finit(int(f.Fd()), unix.MODULE_INIT_COMPRESSED_FILE)
	// EINVAL: a kernel before 5.17 (it knows no such flag) or one built
	// for another compression; EOPNOTSUPP: one built without
	// CONFIG_MODULE_DECOMPRESS. Then it takes the decompressed image.
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EOPNOTSUPP) {
		return err
	}
	image, derr := decompress(f, comp)
	if derr != nil {
		return fmt.Errorf("decompress: %w", derr)
	}
	return l.init(image)
}

// compression is the compression of a module file by its name: "" for a
// plain .ko.
func compression(file string) string {
	for _, c := range []string{"xz", "zst", "gz"} {
		if strings.HasSuffix(file, ".ko."+c) {
			return c
		}
	}
	return ""
}

func decompress(r io.Reader, comp string) ([]byte, error) {
	var rd io.Reader
	switch comp {
	case "xz":
		x, err := xz.NewReader(r)
		if err != nil {
			return nil, err
		}
		rd = x
	case "zst":
		z, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxMemory(maxModuleSize))
		if err != nil {
			return nil, err
		}
		defer z.Close()
		rd = z
	case "gz":
		g, err := gzip.NewReader(r)
		if err != nil {
			return nil, err
		}
		rd = g
	default:
		return nil, fmt.Errorf("unknown compression %q", comp)
	}
	b, err := io.ReadAll(io.LimitReader(rd, maxModuleSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxModuleSize {
		return nil, fmt.Errorf("larger than %d bytes decompressed", maxModuleSize)
	}
	return b, nil
}

// explainLoadError adds what the errors of finit_module and init_module
// mean for an operator.
func explainLoadError(err error) error {
	switch {
	case errors.Is(err, unix.ENOSYS):
		return fmt.Errorf("%w: this kernel cannot load modules", err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w: loading modules needs CAP_SYS_MODULE (the standalone DaemonSet gives it to its install container), "+
			"and is refused to everyone when kernel.modules_disabled is 1", err)
	case errors.Is(err, unix.EKEYREJECTED), errors.Is(err, unix.ENOKEY):
		return fmt.Errorf("%w: the kernel refuses the module's signature", err)
	}
	return err
}
