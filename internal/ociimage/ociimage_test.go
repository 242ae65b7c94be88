package ociimage

import (
	"archive/tar"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func TestBuildWrite(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	_ = os.WriteFile(a, []byte("aaa"), 0o600) // source mode does not matter
	_ = os.WriteFile(b, []byte("bb"), 0o644)
	created := time.Unix(1700000000, 0)
	spec := Spec{
		Files:   map[string]string{"/bin/b": b, "/a": a, "/usr/local/bin/x": a},
		Config:  v1.Config{Entrypoint: []string{"/a"}, Cmd: []string{"-v"}, Env: []string{"K=V"}},
		Arch:    "arm64",
		Created: created,
	}
	write := func(out string) v1.Image {
		t.Helper()
		img, err := Build(spec)
		if err != nil {
			t.Fatal(err)
		}
		if err := Write(out, "qoscni.local/test/img:1", img); err != nil {
			t.Fatal(err)
		}
		tag, _ := name.NewTag("qoscni.local/test/img:1")
		back, err := tarball.ImageFromPath(out, &tag)
		if err != nil {
			t.Fatal(err)
		}
		return back
	}
	img := write(filepath.Join(dir, "out", "img.tar"))

	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != "arm64" || !cfg.Created.Time.Equal(created) ||
		!slices.Equal(cfg.Config.Entrypoint, []string{"/a"}) || !slices.Equal(cfg.Config.Cmd, []string{"-v"}) ||
		!slices.Equal(cfg.Config.Env, []string{"K=V"}) {
		t.Fatalf("config %+v", cfg)
	}

	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %v %v", layers, err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var names []string
	files := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Mode != 0o755 || h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(created) {
			t.Errorf("%s: mode %o uid %d gid %d mtime %v", h.Name, h.Mode, h.Uid, h.Gid, h.ModTime)
		}
		if h.Typeflag == tar.TypeReg {
			data, _ := io.ReadAll(tr)
			files[h.Name] = string(data)
		} else if h.Typeflag != tar.TypeDir {
			t.Errorf("%s: type %c", h.Name, h.Typeflag)
		}
	}
	wantNames := []string{"a", "bin/", "bin/b", "usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/x"}
	if !slices.Equal(names, wantNames) {
		t.Errorf("layer entries %q, want %q", names, wantNames)
	}
	if files["a"] != "aaa" || files["bin/b"] != "bb" || files["usr/local/bin/x"] != "aaa" {
		t.Errorf("layer files %q", files)
	}

	// Reproducible: a second build of the same spec has the same digest.
	d1, _ := img.Digest()
	d2, _ := write(filepath.Join(dir, "img2.tar")).Digest()
	if d1 != d2 {
		t.Fatalf("digests differ: %s %s", d1, d2)
	}
	if _, err := os.Stat(filepath.Join(dir, "out", "img.tar.tmp")); !os.IsNotExist(err) {
		t.Errorf("temporary file left: %v", err)
	}
}

func TestLayerErrors(t *testing.T) {
	src := filepath.Join(t.TempDir(), "f")
	_ = os.WriteFile(src, nil, 0o644)
	for _, files := range []map[string]string{
		{"rel/path": src},
		{"/": src},
		{"/x": src, "/x/y": src},
		{"/a": src, "/a/": src},
		{"/missing": src + ".missing"},
	} {
		if _, err := Layer(files, time.Unix(0, 0)); err == nil {
			t.Errorf("Layer(%v): no error", files)
		}
	}
}

func TestCreatedFromEnv(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "")
	if got := CreatedFromEnv(); !got.Equal(time.Unix(0, 0)) {
		t.Errorf("unset: %v", got)
	}
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	if got := CreatedFromEnv(); !got.Equal(time.Unix(1700000000, 0)) {
		t.Errorf("set: %v", got)
	}
}
