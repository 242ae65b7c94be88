package atomicfile

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// noTemps fails when dir still holds a temporary file.
func noTemps(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), TempPrefix) {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func TestWriteModes(t *testing.T) {
	// The umask must not cut the requested mode (the plugin binary needs 0755).
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	for _, o := range []Options{{Perm: 0o600}, {Perm: 0o755}, {Perm: 0o644, Volatile: true}} {
		dir := t.TempDir()
		p := filepath.Join(dir, "f.json")
		for _, data := range []string{"one", "two, longer"} {
			wrote, err := Write(p, []byte(data), o)
			if err != nil || !wrote {
				t.Fatalf("%+v: Write = %v, %v", o, wrote, err)
			}
			got, err := os.ReadFile(p)
			if err != nil || string(got) != data {
				t.Fatalf("%+v: read %q, %v; want %q", o, got, err, data)
			}
			fi, _ := os.Stat(p)
			if fi.Mode().Perm() != o.Perm {
				t.Errorf("%+v: mode %v", o, fi.Mode().Perm())
			}
		}
		noTemps(t, dir)
	}
}

func TestIfChanged(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "10-qoscni.conflist")
	o := Options{Perm: 0o644, IfChanged: true}
	if wrote, err := Write(p, []byte("a"), o); err != nil || !wrote {
		t.Fatalf("first Write = %v, %v", wrote, err)
	}
	ino := inode(t, p)
	if wrote, err := Write(p, []byte("a"), o); err != nil || wrote {
		t.Fatalf("same content: Write = %v, %v; want false", wrote, err)
	}
	if inode(t, p) != ino {
		t.Error("same content replaced the file")
	}
	// Same bytes, other mode: written.
	if wrote, err := Write(p, []byte("a"), Options{Perm: 0o600, IfChanged: true}); err != nil || !wrote {
		t.Fatalf("other mode: Write = %v, %v; want true", wrote, err)
	}
	// A stream larger than one comparison buffer, equal but for the last byte.
	big := bytes.Repeat([]byte("x"), 200<<10)
	if _, err := Copy(p, bytes.NewReader(big), int64(len(big)), o); err != nil {
		t.Fatal(err)
	}
	if wrote, err := Copy(p, bytes.NewReader(big), int64(len(big)), o); err != nil || wrote {
		t.Fatalf("same stream: Copy = %v, %v; want false", wrote, err)
	}
	big2 := bytes.Clone(big)
	big2[len(big2)-1] = 'y'
	if wrote, err := Copy(p, bytes.NewReader(big2), int64(len(big2)), o); err != nil || !wrote {
		t.Fatalf("changed stream: Copy = %v, %v; want true", wrote, err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, big2) {
		t.Error("Copy wrote other bytes")
	}
	noTemps(t, dir)
}

func TestExclusive(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "eth0")
	o := Options{Perm: 0o600, Volatile: true, Exclusive: true}
	if _, err := Write(p, []byte("first"), o); err != nil {
		t.Fatal(err)
	}
	_, err := Write(p, []byte("second"), o)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second exclusive Write: %v, want fs.ErrExist", err)
	}
	if got, _ := os.ReadFile(p); string(got) != "first" {
		t.Errorf("content %q, want the first writer's", got)
	}
	noTemps(t, dir)
}

func TestTempRenameRemove(t *testing.T) {
	dir := t.TempDir()
	tmp, err := Temp(dir, []byte("owner"), Options{Perm: 0o600})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(tmp) != dir || !strings.HasPrefix(filepath.Base(tmp), TempPrefix) {
		t.Errorf("Temp made %s", tmp)
	}
	dst := filepath.Join(dir, "10.0.0.1")
	if err := Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(dst); string(got) != "owner" {
		t.Errorf("content %q", got)
	}
	if removed, err := Remove(dst); err != nil || !removed {
		t.Errorf("Remove = %v, %v", removed, err)
	}
	if removed, err := Remove(dst); err != nil || removed {
		t.Errorf("Remove of nothing = %v, %v", removed, err)
	}
	noTemps(t, dir)
}

func TestWriteFailsCleanly(t *testing.T) {
	dir := t.TempDir()
	// A directory at the target: the rename fails, the temporary file goes.
	p := filepath.Join(dir, "d")
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := Write(p, []byte("x"), Options{Perm: 0o600}); err == nil {
		t.Fatal("Write over a directory succeeded")
	}
	noTemps(t, dir)
	if _, err := Write(filepath.Join(dir, "missing", "f"), []byte("x"), Options{Perm: 0o600}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Write into a missing directory: %v", err)
	}
}
