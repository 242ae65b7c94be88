// Package ociimage builds small container images without a Docker daemon or
// a registry: one layer of files on an empty (scratch) base, written as a
// docker-archive tarball that "ctr images import", "docker load" and
// "podman load" accept. The image is reproducible: the same files and spec
// give the same digest (sorted entries, fixed times, owner root).
package ociimage

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Spec describes an image.
type Spec struct {
	// Files maps an absolute path in the image to a source file on disk.
	// Each file gets mode 0755; its parent directories are created.
	Files map[string]string
	// Config is the run configuration: Entrypoint, Cmd, Env, ExposedPorts,
	// Labels...
	Config v1.Config
	// Arch is the image architecture (the binaries' GOARCH); empty means
	// runtime.GOARCH. The OS is always linux.
	Arch string
	// Created is the image creation time and the mtime of every layer
	// entry; see CreatedFromEnv.
	Created time.Time
}

// CreatedFromEnv is the reproducible creation time: $SOURCE_DATE_EPOCH if
// set and valid, else the Unix epoch.
func CreatedFromEnv() time.Time {
	if n, err := strconv.ParseInt(os.Getenv("SOURCE_DATE_EPOCH"), 10, 64); err == nil {
		return time.Unix(n, 0).UTC()
	}
	return time.Unix(0, 0).UTC()
}

// Build makes the image described by s.
func Build(s Spec) (v1.Image, error) {
	layerTar, err := Layer(s.Files, s.Created)
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
	cfg.OS, cfg.Architecture = "linux", s.Arch
	if cfg.Architecture == "" {
		cfg.Architecture = runtime.GOARCH
	}
	cfg.Created = v1.Time{Time: s.Created.UTC()}
	cfg.Config = s.Config
	return mutate.ConfigFile(img, cfg)
}

// Layer is the uncompressed layer tar of files (path in image -> source
// file): the files with mode 0755 and their parent directories with mode
// 0755, sorted by name, owner 0:0, mtime mtime.
func Layer(files map[string]string, mtime time.Time) ([]byte, error) {
	type entry struct{ name, src string } // src "" for a directory
	seen := map[string]bool{}
	var entries []entry
	for p, src := range files {
		n := strings.TrimPrefix(path.Clean("/"+p), "/")
		if n == "" || !path.IsAbs(p) {
			return nil, fmt.Errorf("image path %q: want an absolute file path", p)
		}
		if seen[n] {
			return nil, fmt.Errorf("image path %q: given twice", p)
		}
		seen[n] = true
		entries = append(entries, entry{n, src})
		for d := path.Dir(n); d != "."; d = path.Dir(d) {
			if !seen[d+"/"] {
				seen[d+"/"] = true
				entries = append(entries, entry{name: d + "/"})
			}
		}
	}
	for _, e := range entries {
		if e.src != "" && seen[e.name+"/"] {
			return nil, fmt.Errorf("image path /%s: both a file and a directory", e.name)
		}
	}
	// A directory "d/" is a prefix of its entries, so it sorts before them.
	slices.SortFunc(entries, func(a, b entry) int { return strings.Compare(a.name, b.name) })

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Typeflag: tar.TypeDir, Name: e.name, Mode: 0o755, ModTime: mtime}
		var data []byte
		if e.src != "" {
			var err error
			if data, err = os.ReadFile(e.src); err != nil {
				return nil, fmt.Errorf("read /%s: %w", e.name, err)
			}
			h.Typeflag, h.Size = tar.TypeReg, int64(len(data))
		}
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

// Write writes img to out as a docker-archive tarball whose manifest names
// tag (e.g. "qoscni/qoscni:dev"). It writes out.tmp and renames it, so out
// is never half written; out's directory is created.
func Write(out, tag string, img v1.Image) error {
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", tag, err)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".tmp"
	if err := tarball.WriteToFile(tmp, ref, img); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", out, err)
	}
	return os.Rename(tmp, out)
}
