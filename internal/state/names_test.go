package state

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/atomicfile"
)

func TestFileNamesDistinct(t *testing.T) {
	long := strings.Repeat("0123456789abcdef", 256) // 4096 bytes
	pairs := [][2]Key{
		// "_" is legal in both parts.
		{{"n", "a_b", "eth0"}, {"n", "a", "b_eth0"}},
		{{"n", "a_", "b"}, {"n", "a", "_b"}},
		// Each non-ASCII byte is its own escape.
		{{"n", "c", "éth0"}, {"n", "c", "üth0"}},
		{{"n", "c", "%th0"}, {"n", "c", "éth0"}},
		{{"n", "c", "%25"}, {"n", "c", "%"}},
		// The escape of "." at the start is not a plain "%2E".
		{{"n", ".x", "eth0"}, {"n", "%2Ex", "eth0"}},
		// Long IDs that share their first 4 KiB.
		{{"n", long + "a", "eth0"}, {"n", long + "b", "eth0"}},
		{{"n", long, "eth0"}, {"n", long, "eth1"}},
		{{"n", long, "e_th0"}, {"n", long + "_e", "th0"}},
		// Networks.
		{{"a_b", "c", "eth0"}, {"a%5Fb", "c", "eth0"}},
		{{"éth", "c", "eth0"}, {"üth", "c", "eth0"}},
		{{long + "x", "c", "eth0"}, {long + "y", "c", "eth0"}},
	}
	s := New("/var/lib/qoscni")
	for _, p := range pairs {
		if a, b := s.path(p[0]), s.path(p[1]); a == b {
			t.Errorf("%q and %q share the file %s", p[0], p[1], a)
		}
	}
}

func TestFileNameBounds(t *testing.T) {
	s := New("/var/lib/qoscni")
	for _, k := range []Key{
		{"n", "a", "eth0"},
		{"n", strings.Repeat("x", 150), "eth0"},
		{"n", strings.Repeat("x", 194), "eth0"},
		{"n", strings.Repeat("x", 195), "eth0"},
		{"n", strings.Repeat("é", 100), "ééééééé0"},
		{"n", strings.Repeat("0123456789abcdef", 256), "eth0"},
		{"n", strings.Repeat("%", 4096), strings.Repeat("%", 4096)},
		{strings.Repeat("_", 4096), "c", "eth0"},
		{".", "c", "eth0"},
		{"..", "..", ".."},
	} {
		p := s.path(k)
		rel, err := filepath.Rel(s.Dir, p)
		if err != nil || strings.HasPrefix(rel, ".") || strings.Count(rel, "/") != 1 {
			t.Errorf("%.60q: path %s is not one directory below the store", k, p)
		}
		for _, elem := range strings.Split(rel, "/") {
			// atomicfile's temporary name adds ".tmp-", "." and 16 hex digits.
			if len(elem) > maxName || len(atomicfile.TempPrefix+elem+".0123456789abcdef") > 255 {
				t.Errorf("%.60q: name of %d bytes: %s", k, len(elem), elem)
			}
			if elem == "" || strings.HasPrefix(elem, ".") {
				t.Errorf("%.60q: empty or hidden name %q", k, elem)
			}
		}
	}
}

func TestKeyFromFileName(t *testing.T) {
	for _, k := range []Key{
		{"n", "a", "eth0"},
		{"n", "a_b", "eth0"},
		{"n", "a", "b_eth0"},
		{"n", "A_b.c-D", "eth-0.1_x"},
		{"n", "c", "éth0"},
		{"n", "c", "üth0"},
		{"n", "c", "eth%d"},
		{"n", ".x", ".y"},
		{"n", "x.", "y."},
		{"n", "a~b", "eth0"},
		{"n", strings.Repeat("x", 190), "eth0"}, // 200 bytes: still plain
	} {
		name := FileName(k.ContainerID, k.IfName)
		got, ok := KeyFromFileName(k.Network, name)
		if !ok || got != k {
			t.Errorf("%q -> %s -> %q, %v", k, name, got, ok)
		}
	}
	// Bounded names cannot be reversed.
	for _, cid := range []string{strings.Repeat("x", 191), strings.Repeat("0123456789abcdef", 256)} {
		name := FileName(cid, "eth0")
		if !strings.Contains(name, "~") {
			t.Errorf("%d-byte ID: name %s is not bounded", len(cid), name)
		}
		if k, ok := KeyFromFileName("n", name); ok {
			t.Errorf("bounded name %s gave %q", name, k)
		}
	}
	// What the store never writes does not parse.
	for _, name := range []string{
		"", ".json", "_.json", "a_.json", "_b.json", "a_b", "a_b.json.tmp-1", "a_b_c.json",
		"a%5f_b.json",   // lower-case hex
		"a%41_b.json",   // "A" needs no escape
		"a%2_b.json",    // short escape
		"a%_b.json",     // bare "%"
		".a_b.json",     // a leading "." is escaped
		"a%2E_b.json",   // a "." elsewhere is not
		"a~0123_b.json", // bounded form
		"junk.json", "trunc eth0.json", "é_eth0.json",
		strings.Repeat("x", 191) + "_eth0.json", // over the bound: would be hashed
	} {
		if k, ok := KeyFromFileName("n", name); ok {
			t.Errorf("%q parsed as %q", name, k)
		}
	}
}

// The pairs that used to share a file are two records: saving, loading
// and deleting one leaves the other whole.
func TestCollidingKeysAreSeparate(t *testing.T) {
	s := New(t.TempDir())
	long := strings.Repeat("0123456789abcdef", 256)
	keys := []Key{
		{"n", "a_b", "eth0"}, {"n", "a", "b_eth0"},
		{"n", "c", "éth0"}, {"n", "c", "üth0"},
		{"n", "a", "eth0"}, {"n", long, "eth0"}, {"n", long + "x", "eth0"},
		{"a_b", "c", "eth0"}, {"a%5Fb", "c", "eth0"},
	}
	for i, k := range keys {
		if err := s.Save(&Record{Network: k.Network, ContainerID: k.ContainerID, IfName: k.IfName, HostVeth: string(rune('a' + i))}); err != nil {
			t.Fatalf("Save %.40q: %v", k, err)
		}
	}
	for i, k := range keys {
		r, err := s.Load(k)
		if err != nil || r == nil || r.Key() != k || r.HostVeth != string(rune('a'+i)) {
			t.Fatalf("Load %.40q: %+v %v", k, r, err)
		}
	}
	entries, bad, err := s.Entries("")
	if err != nil || len(entries) != len(keys) || len(bad) != 0 {
		t.Fatalf("Entries: %d, %d bad, %v", len(entries), len(bad), err)
	}
	for _, e := range entries {
		if e.Misplaced {
			t.Errorf("%s is misplaced", e.Path)
		}
		k, ok := KeyFromFileName(e.Record.Network, filepath.Base(e.Path))
		if hashed := strings.Contains(e.Path, "~"); ok == hashed || ok && k != e.Record.Key() {
			t.Errorf("%s: key %q %v, record %q", e.Path, k, ok, e.Record.Key())
		}
	}
	if err := s.Delete(keys[1]); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.Load(keys[0]); r == nil {
		t.Fatal("deleting a/b_eth0 deleted a_b/eth0")
	}
	if r, _ := s.Load(keys[1]); r != nil {
		t.Fatal("a/b_eth0 not deleted")
	}
}

func TestEntriesMisplaced(t *testing.T) {
	s := New(t.TempDir())
	r := &Record{Network: "other", ContainerID: "c", IfName: "net1", HostVeth: "v"}
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	if err := s.Save(&Record{Network: "n", ContainerID: "c", IfName: "eth0", HostVeth: "v"}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(s.Path(r.Key()))
	if err != nil {
		t.Fatal(err)
	}
	// A copy in another network's directory, and one under another name.
	for _, p := range []string{filepath.Join(s.netDir("n"), "c_net1.json"), filepath.Join(s.netDir("other"), "d_net1.json")} {
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	entries, _, err := s.Entries("")
	if err != nil {
		t.Fatal(err)
	}
	var misplaced []string
	for _, e := range entries {
		if e.Misplaced {
			misplaced = append(misplaced, filepath.Base(filepath.Dir(e.Path))+"/"+filepath.Base(e.Path))
		}
	}
	if len(entries) != 4 || strings.Join(misplaced, " ") != "n/c_net1.json other/d_net1.json" {
		t.Errorf("%d entries, misplaced %v", len(entries), misplaced)
	}
}

// FuzzFileName: every key has a bounded name of its own; a plain name
// gives the key back, and a name that parses is the name of what it gives.
func FuzzFileName(f *testing.F) {
	for _, s := range [][2]string{{"a_b", "eth0"}, {"a", "b_eth0"}, {"c", "éth0"}, {".", ".."}, {strings.Repeat("x", 191), "e"}, {"%41", "~"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, cid, ifname string) {
		if cid == "" || ifname == "" {
			return
		}
		name := FileName(cid, ifname)
		if len(name) > maxName || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") || strings.Count(name, "_") != 1 {
			t.Fatalf("%q/%q: bad name %q", cid, ifname, name)
		}
		k, ok := KeyFromFileName("n", name)
		if hashed := strings.Contains(name, "~"); ok == hashed {
			t.Fatalf("%q/%q: name %q parsed %v", cid, ifname, name, ok)
		}
		if ok && (k.ContainerID != cid || k.IfName != ifname) {
			t.Fatalf("%q/%q -> %q -> %q", cid, ifname, name, k)
		}
		if k, ok := KeyFromFileName("n", cid+".json"); ok && FileName(k.ContainerID, k.IfName) != cid+".json" {
			t.Fatalf("%q parsed as %q, whose name differs", cid+".json", k)
		}
	})
}

func TestCacheEntriesMisplaced(t *testing.T) {
	s := New(t.TempDir())
	r := &Record{Network: "other", ContainerID: "c", IfName: "net1", HostVeth: "v"}
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(s.Path(r.Key()))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(s.netDir("n"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.netDir("n"), "c_net1.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	c := NewCache(s)
	for pass := 0; pass < 2; pass++ { // decoded, then cached
		entries, _, err := c.Entries()
		if err != nil || len(entries) != 2 {
			t.Fatalf("pass %d: %d entries, %v", pass, len(entries), err)
		}
		for _, e := range entries {
			if want := e.Path != s.Path(r.Key()); e.Misplaced != want {
				t.Errorf("pass %d: %s misplaced %v", pass, e.Path, e.Misplaced)
			}
		}
	}
	if recs, _, _ := c.List(); len(recs) != 2 {
		t.Errorf("List: %d records", len(recs))
	}
}
