package images

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/qoscni/qoscni/internal/ociimage"
	"github.com/qoscni/qoscni/test/e2e/cluster"
)

const (
	// CoreDNSRepo is the CoreDNS image's repository; its tag is the
	// version the binary reports (CoreDNS returns the full reference).
	CoreDNSRepo = "qoscni.local/e2e/coredns"
	// CoreDNSConfDir is where the image's CoreDNS reads its Corefile
	// (CoreDNSConfDir/Corefile, the Cmd's -conf): mount the coredns
	// ConfigMap (key Corefile) there, as the upstream Deployment does.
	CoreDNSConfDir = "/etc/coredns"
	// CoreDNSFile is the tarball's name in the directory CoreDNS writes.
	CoreDNSFile = "coredns.tar"
)

// corednsImage is the CoreDNS tarball, built once per test process from
// the binary it was made of.
var corednsImage struct {
	sync.Mutex
	bin, ref string
	data     []byte
}

// CoreDNS writes the CoreDNS image as a docker-archive tarball into a
// temp dir of t's and returns its path and image reference. The image
// holds only the static coredns binary that test/e2e/build.sh caches
// (the test skips, or fails where CI built it, when it is not built:
// cluster.Binary): entrypoint /coredns, cmd -conf
// CoreDNSConfDir/Corefile, ports 53/udp, 53/tcp and 9153/tcp (metrics).
// The image is made once per test process (it is reproducible: same
// binary, same digest).
func CoreDNS(t testing.TB) (tarPath, ref string) {
	t.Helper()
	bin := cluster.Binary(t, "coredns")
	corednsImage.Lock()
	defer corednsImage.Unlock()
	if corednsImage.bin != bin {
		ref, data, err := buildCoreDNS(bin)
		if err != nil {
			t.Fatalf("e2e images: coredns: %v", err)
		}
		corednsImage.bin, corednsImage.ref, corednsImage.data = bin, ref, data
	}
	tarPath = filepath.Join(t.TempDir(), CoreDNSFile)
	if err := os.WriteFile(tarPath, corednsImage.data, 0o644); err != nil {
		t.Fatalf("e2e images: %v", err)
	}
	return tarPath, corednsImage.ref
}

func buildCoreDNS(bin string) (ref string, data []byte, err error) {
	// The tag is what the binary says it is ("CoreDNS-1.15.0" on the
	// first line), so the image cannot claim another version.
	out, err := exec.Command(bin, "-version").Output()
	if err != nil {
		return "", nil, fmt.Errorf("%s -version: %w", bin, err)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	version, ok := strings.CutPrefix(strings.TrimSpace(first), "CoreDNS-")
	if !ok || version == "" {
		return "", nil, fmt.Errorf("%s -version: %q, want CoreDNS-<version>", bin, first)
	}
	ref = CoreDNSRepo + ":" + version

	img, err := ociimage.Build(ociimage.Spec{
		Files: map[string]string{"/coredns": bin},
		Config: v1.Config{
			Entrypoint: []string{"/coredns"},
			Cmd:        []string{"-conf", CoreDNSConfDir + "/Corefile"},
			ExposedPorts: map[string]struct{}{
				"53/udp": {}, "53/tcp": {}, "9153/tcp": {},
			},
		},
		Created: ociimage.CreatedFromEnv(),
	})
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", ref, err)
	}
	tmp, err := os.MkdirTemp("", "qoscni-e2e-coredns-")
	if err != nil {
		return "", nil, err
	}
	defer os.RemoveAll(tmp)
	p := filepath.Join(tmp, CoreDNSFile)
	if err := ociimage.Write(p, ref, img); err != nil {
		return "", nil, fmt.Errorf("%s: %w", ref, err)
	}
	data, err = os.ReadFile(p)
	return ref, data, err
}
