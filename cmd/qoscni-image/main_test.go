package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/qoscni/qoscni/internal/agent/install"
)

func TestImageTarball(t *testing.T) {
	dir := t.TempDir()
	plugin, agent := filepath.Join(dir, "qoscni"), filepath.Join(dir, "qoscni-agent")
	_ = os.WriteFile(plugin, []byte("plugin"), 0o755)
	_ = os.WriteFile(agent, []byte("agent"), 0o755)
	out := filepath.Join(dir, "img.tar")
	args := []string{"-o", out, "--tag", "qoscni/qoscni:dev", "--plugin", plugin, "--agent", agent, "--arch", "amd64"}
	var errb bytes.Buffer
	if rc := run(args, &errb); rc != 0 {
		t.Fatalf("rc %d: %s", rc, errb.String())
	}

	// docker-archive layout: manifest.json naming the tag, config, layers.
	f, _ := os.Open(out)
	defer f.Close()
	tr := tar.NewReader(f)
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == "manifest.json" {
			if err := json.NewDecoder(tr).Decode(&manifest); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(manifest) != 1 || !slices.Equal(manifest[0].RepoTags, []string{"qoscni/qoscni:dev"}) || len(manifest[0].Layers) != 1 {
		t.Fatalf("manifest.json %+v", manifest)
	}

	tag, _ := name.NewTag("qoscni/qoscni:dev")
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != "amd64" ||
		!slices.Equal(cfg.Config.Entrypoint, []string{install.ImageBinDir + "/" + install.AgentBinary}) {
		t.Fatalf("config %+v", cfg)
	}
	layers, _ := img.Layers()
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]string{}
	lt := tar.NewReader(rc)
	for {
		h, err := lt.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if h.Mode != 0o755 {
				t.Errorf("%s mode %o", h.Name, h.Mode)
			}
			b, _ := io.ReadAll(lt)
			files["/"+h.Name] = string(b)
		}
	}
	want := map[string]string{
		install.ImageBinDir + "/" + install.PluginBinary: "plugin",
		install.ImageBinDir + "/" + install.AgentBinary:  "agent",
	}
	if len(files) != 2 || files[install.ImageBinDir+"/qoscni"] != want[install.ImageBinDir+"/qoscni"] ||
		files[install.ImageBinDir+"/qoscni-agent"] != want[install.ImageBinDir+"/qoscni-agent"] {
		t.Fatalf("layer files %v, want %v", files, want)
	}

	// Reproducible: the same binaries give the same digest.
	d1, _ := img.Digest()
	out2 := filepath.Join(dir, "img2.tar")
	if rc := run(append([]string{"-o", out2}, args[2:]...), &errb); rc != 0 {
		t.Fatal(errb.String())
	}
	img2, _ := tarball.ImageFromPath(out2, &tag)
	if d2, _ := img2.Digest(); d1 != d2 {
		t.Fatalf("digests differ: %s %s", d1, d2)
	}
}
