package state

import (
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"testing"
)

func TestRegistry(t *testing.T) {
	reg := filepath.Join(t.TempDir(), "statedirs")
	if dirs, errs := RegisteredDirs(reg); dirs != nil || errs != nil {
		t.Fatalf("missing registry: %q %v", dirs, errs)
	}
	for _, d := range []string{"/tmp/x/state", "/tmp/x/state/", "/var/lib/other//state", "/tmp/x/state"} {
		if err := Register(reg, d); err != nil {
			t.Fatal(err)
		}
	}
	if err := Register(reg, "relative/state"); err == nil {
		t.Error("relative dir registered")
	}
	entries, _ := os.ReadDir(reg)
	if len(entries) != 2 {
		t.Errorf("%d entries for two directories", len(entries))
	}
	// What is not an entry: atomicfile's temporary files, other names, and
	// an entry that does not hold an absolute path (reported).
	for name, content := range map[string]string{".abc.dir.tmp-1": "/tmp/t", "README": "/tmp/r", "bad.dir": "not/absolute\n"} {
		if err := os.WriteFile(filepath.Join(reg, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	dirs, errs := RegisteredDirs(reg)
	sort.Strings(dirs)
	if want := []string{"/tmp/x/state", "/var/lib/other/state"}; !reflect.DeepEqual(dirs, want) {
		t.Errorf("dirs = %q, want %q", dirs, want)
	}
	if len(errs) != 1 {
		t.Errorf("errs = %v, want the bad entry", errs)
	}
	if dirs, errs := RegisteredDirs(""); dirs != nil || errs != nil {
		t.Errorf("no registry: %q %v", dirs, errs)
	}
}

func TestCachesListEveryDir(t *testing.T) {
	a, b := New(filepath.Join(t.TempDir(), "a")), New(filepath.Join(t.TempDir(), "b"))
	// One attachment name in both networks' stores: two records, each
	// with its own store.
	for _, s := range []*Store{a, b} {
		if err := s.Save(&Record{Network: "net", ContainerID: "c1", IfName: "eth0"}); err != nil {
			t.Fatal(err)
		}
	}
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c := NewCaches()
	entries, bad, errs := c.Entries([]string{a.Dir, b.Dir, a.Dir, filepath.Join(t.TempDir(), "missing"), notDir})
	if len(entries) != 2 || len(bad) != 0 || len(errs) != 1 {
		t.Fatalf("entries %+v bad %v errs %v", entries, bad, errs)
	}
	for _, e := range entries {
		if filepath.Dir(filepath.Dir(e.Path)) != e.Store.Dir || e.Misplaced {
			t.Errorf("entry %s has store %s", e.Path, e.Store.Dir)
		}
	}
	if entries[0].Store.Dir == entries[1].Store.Dir {
		t.Error("both records attributed to one store")
	}
	entries, _, errs = c.Entries([]string{b.Dir})
	if len(entries) != 1 || entries[0].Store.Dir != b.Dir || len(errs) != 0 || len(c.byDir) != 1 {
		t.Errorf("after a dir went: %+v %v (%d caches)", entries, errs, len(c.byDir))
	}
}
