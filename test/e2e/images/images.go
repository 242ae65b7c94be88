// Package images makes the container images of the end-to-end tests
// offline: no registry is reachable from the test machines, so the pod
// sandbox (pause) and the workload are built from ./pause and ./workload,
// packaged as docker-archive tarballs and imported into containerd.
//
//	pause, workload := images.Build(t, t.TempDir())
//	images.Import(t, containerdAddress, pause, workload)
//	// containerd config: sandbox_image = images.Pause
//	// pod: image images.Workload, ports images.WorkloadTCPPort/UDPPort
package images

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/qoscni/qoscni/internal/ociimage"
)

const (
	// Pause is the sandbox image (containerd's sandbox_image): /pause
	// blocks, reaps zombies and exits 0 on SIGTERM.
	Pause = "qoscni.local/e2e/pause:1"
	// Workload is the workload image: entrypoint /workload, which answers
	// on TCP WorkloadTCPPort with "<hostname> <remote-ip:port>\n" and on
	// UDP WorkloadUDPPort with "<hostname> <datagram>".
	Workload        = "qoscni.local/e2e/workload:1"
	WorkloadTCPPort = 8080
	WorkloadUDPPort = 8081

	// PauseFile and WorkloadFile are the tarballs' names in Build's dir.
	PauseFile    = "pause.tar"
	WorkloadFile = "workload.tar"
)

var (
	once     sync.Once
	tarData  map[string][]byte // file name -> tarball
	buildErr error
)

// Build writes the Pause and Workload images as docker-archive tarballs into
// dir (the caller's t.TempDir()) and returns their paths. The binaries are
// compiled (static) and packaged once per test process; the process keeps
// the tarballs in memory, not on disk. A build failure fails the test with
// the go build output.
func Build(t testing.TB, dir string) (pauseTar, workloadTar string) {
	t.Helper()
	once.Do(func() { tarData, buildErr = build() })
	if buildErr != nil {
		t.Fatalf("e2e images: %v", buildErr)
	}
	pauseTar, workloadTar = filepath.Join(dir, PauseFile), filepath.Join(dir, WorkloadFile)
	for p, data := range map[string][]byte{pauseTar: tarData[PauseFile], workloadTar: tarData[WorkloadFile]} {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatalf("e2e images: %v", err)
		}
	}
	return pauseTar, workloadTar
}

func build() (map[string][]byte, error) {
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "qoscni-e2e-images-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)

	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = "/usr/local/go/bin/go"
	}
	// With -o a directory, each main package becomes <dir>/<package dir name>.
	cmd := exec.Command(gobin, "build", "-trimpath", "-ldflags", "-s -w", "-o", tmp+"/",
		"./test/e2e/images/pause", "./test/e2e/images/workload")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./test/e2e/images/pause ./test/e2e/images/workload: %v\n%s", err, out)
	}

	created := ociimage.CreatedFromEnv()
	ports := map[string]struct{}{
		strconv.Itoa(WorkloadTCPPort) + "/tcp": {},
		strconv.Itoa(WorkloadUDPPort) + "/udp": {},
	}
	out := map[string][]byte{}
	for _, im := range []struct {
		file, tag, bin string
		ports          map[string]struct{}
	}{
		{PauseFile, Pause, "pause", nil},
		{WorkloadFile, Workload, "workload", ports},
	} {
		img, err := ociimage.Build(ociimage.Spec{
			Files:   map[string]string{"/" + im.bin: filepath.Join(tmp, im.bin)},
			Config:  v1.Config{Entrypoint: []string{"/" + im.bin}, ExposedPorts: im.ports},
			Created: created,
		})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", im.tag, err)
		}
		p := filepath.Join(tmp, im.file)
		if err := ociimage.Write(p, im.tag, img); err != nil {
			return nil, fmt.Errorf("%s: %w", im.tag, err)
		}
		if out[im.file], err = os.ReadFile(p); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// moduleRoot is the directory of the main module's go.mod: three levels up
// from this file, or (when the test binary was built with -trimpath and
// the file name is not a path) the nearest go.mod above the working
// directory, which go test sets to the package's directory.
func moduleRoot() (string, error) {
	var dirs []string
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		dirs = append(dirs, filepath.Join(filepath.Dir(file), "..", "..", ".."))
	}
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			dirs = append(dirs, d)
			if d == filepath.Dir(d) {
				break
			}
		}
	}
	for _, d := range dirs {
		if data, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil &&
			strings.HasPrefix(string(data), "module github.com/qoscni/qoscni\n") {
			return filepath.Clean(d), nil
		}
	}
	return "", fmt.Errorf("module github.com/qoscni/qoscni not found above the source file or the working directory")
}

// Import imports the docker-archive tarballs into the k8s.io namespace of
// the containerd at address (its gRPC socket), where the CRI plugin sees
// them, and checks that every image reference they name is listed. A
// failure fails the test with ctr's output. It runs Debian's ctr (for
// containerd 1.6); ImportWith names another.
func Import(t testing.TB, address string, tars ...string) {
	t.Helper()
	ImportWith(t, "ctr", address, tars...)
}

// ImportWith is Import with the ctr binary ctrBin, the one of the
// containerd at address (containerd.Containerd.Import picks it).
func ImportWith(t testing.TB, ctrBin, address string, tars ...string) {
	t.Helper()
	ctr := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
		defer cancel()
		args = append([]string{"--address", address, "-n", "k8s.io"}, args...)
		out, err := exec.CommandContext(ctx, ctrBin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	var want []string
	for _, tar := range tars {
		m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(tar) })
		if err != nil {
			t.Fatalf("import %s: %v", tar, err)
		}
		for _, d := range m {
			for _, tag := range d.RepoTags {
				want = append(want, normalize(tag))
			}
		}
		ctr("images", "import", tar)
	}
	have := strings.Fields(ctr("images", "ls", "-q"))
	for _, ref := range want {
		if !slices.Contains(have, ref) {
			t.Fatalf("ctr images import: %s not listed after the import; images: %q", ref, have)
		}
	}
}

// normalize is a reference as ctr lists it: "qoscni/qoscni:dev" is
// "docker.io/qoscni/qoscni:dev", "busybox:1" "docker.io/library/busybox:1",
// "index.docker.io/x:1" "docker.io/library/x:1"; a reference whose first
// component is another host (has a dot or a port, or is localhost), like
// qoscni.local/..., stays as it is.
func normalize(ref string) string {
	first, rest, found := strings.Cut(ref, "/")
	switch {
	case found && (first == "docker.io" || first == "index.docker.io"):
		return normalize(rest)
	case found && (strings.ContainsAny(first, ".:") || first == "localhost"):
		return ref
	case !found:
		return "docker.io/library/" + ref
	}
	return "docker.io/" + ref
}
