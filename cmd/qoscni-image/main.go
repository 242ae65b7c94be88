// Command qoscni-image builds qoscni's container image without a Docker
// daemon: both static binaries in /usr/local/bin of an otherwise empty
// (scratch) image, entrypoint qoscni-agent, written as a docker-archive
// tarball that "ctr images import", "docker load" and "podman load" accept.
//
//	qoscni-image -o bin/qoscni-image.tar --tag qoscni/qoscni:dev
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"strconv"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/qoscni/qoscni/internal/agent/install"
	"github.com/qoscni/qoscni/internal/ociimage"
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
	img, err := build(map[string]string{install.PluginBinary: *plugin, install.AgentBinary: *agent}, *arch, ociimage.CreatedFromEnv())
	if err == nil {
		err = ociimage.Write(*out, *tag, img)
	}
	if err != nil {
		fmt.Fprintln(stderr, "qoscni-image:", err)
		return 1
	}
	d, _ := img.Digest()
	fmt.Fprintf(os.Stdout, "wrote %s (%s, %s)\n", *out, *tag, d)
	return 0
}

// build makes the image: the binaries (name -> source file) in
// install.ImageBinDir, the agent as entrypoint.
func build(binaries map[string]string, arch string, created time.Time) (v1.Image, error) {
	files := map[string]string{}
	for n, src := range binaries {
		if _, err := os.Stat(src); err != nil {
			return nil, fmt.Errorf("%s binary: %w (run make build first)", n, err)
		}
		files[path.Join(install.ImageBinDir, n)] = src
	}
	return ociimage.Build(ociimage.Spec{
		Files:   files,
		Arch:    arch,
		Created: created,
		Config: v1.Config{
			Entrypoint:   []string{path.Join(install.ImageBinDir, install.AgentBinary)},
			Cmd:          []string{"serve"},
			Env:          []string{"PATH=" + install.ImageBinDir},
			ExposedPorts: map[string]struct{}{strconv.Itoa(install.ListenPort) + "/tcp": {}},
			Labels: map[string]string{
				"org.opencontainers.image.title":  "qoscni",
				"org.opencontainers.image.source": "https://github.com/qoscni/qoscni",
			},
		},
	})
}
