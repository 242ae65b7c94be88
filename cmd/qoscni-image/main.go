// Command qoscni-image builds qoscni's container image without a Docker
// daemon: both static binaries in /usr/local/bin of an otherwise empty
// (scratch) image, entrypoint qoscni-agent, written as a docker-archive
// tarball that "ctr images import", "docker load" and "podman load" accept.
//
//	qoscni-image -o bin/qoscni-image.tar --tag qoscni/qoscni:dev
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/qoscni/qoscni/install"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("qoscni-image", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("o", "bin/qoscni-image.tar", "output tarball")
	tag := fs.String("tag", "qoscni/qoscni:dev", "image reference recorded in the tarball")
	plugin := fs.String("plugin", "bin/"+install.PluginBinary, "plugin binary (static)")
	agent := fs.String("agent", "bin/"+install.AgentBinary, "agent binary (static)")
	arch := fs.String("arch", runtime.GOARCH, "image architecture (the binaries' GOARCH)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	// Reproducible: the same binaries give the same image digest.
	created := time.Unix(0, 0).UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			created = time.Unix(n, 0).UTC()
		}
	}
	img, err := build(map[string]string{install.PluginBinary: *plugin, install.AgentBinary: *agent}, *arch, created)
	if err == nil {
		err = write(*out, *tag, img)
	}
	if err != nil {
		fmt.Fprintln(stderr, "qoscni-image:", err)
		return 1
	}
	d, _ := img.Digest()
	fmt.Fprintf(os.Stdout, "wrote %s (%s, %s)\n", *out, *tag, d)
	return 0
}

// build makes the image: one layer with the binaries (name -> source file).
func build(binaries map[string]string, arch string, created time.Time) (v1.Image, error) {
	layerTar, err := binaryLayer(binaries, created)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", arch
	cfg.Created = v1.Time{Time: created}
	cfg.Config.Entrypoint = []string{path.Join(install.ImageBinDir, install.AgentBinary)}
	cfg.Config.Cmd = []string{"serve"}
	cfg.Config.Env = []string{"PATH=" + install.ImageBinDir}
	cfg.Config.ExposedPorts = map[string]struct{}{strconv.Itoa(install.ListenPort) + "/tcp": {}}
	cfg.Config.Labels = map[string]string{
		"org.opencontainers.image.title":  "qoscni",
		"org.opencontainers.image.source": "https://github.com/qoscni/qoscni",
	}
	return mutate.ConfigFile(img, cfg)
}

// binaryLayer is a tar of usr/, usr/local/, usr/local/bin/ and the binaries
// (sorted, fixed times and owners: reproducible).
func binaryLayer(binaries map[string]string, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := ""
	for _, part := range []string{"usr", "local", "bin"} {
		dir = path.Join(dir, part)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755, ModTime: mtime}); err != nil {
			return nil, err
		}
	}
	if dir != install.ImageBinDir[1:] {
		return nil, fmt.Errorf("layer dir %s is not %s", dir, install.ImageBinDir)
	}
	for _, n := range []string{install.AgentBinary, install.PluginBinary} {
		src, ok := binaries[n]
		if !ok {
			continue
		}
		data, err := os.ReadFile(src)
		if err != nil {
			return nil, fmt.Errorf("read %s binary: %w (run make build first)", n, err)
		}
		h := &tar.Header{Typeflag: tar.TypeReg, Name: path.Join(dir, n), Mode: 0o755, Size: int64(len(data)), ModTime: mtime}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func write(out, tag string, img v1.Image) error {
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", tag, err)
	}
	if err := os.MkdirAll(path.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".tmp"
	if err := tarball.WriteToFile(tmp, ref, img); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", out, err)
	}
	return os.Rename(tmp, out)
}
