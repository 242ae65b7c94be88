package cniconf

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestConfigFilesOrder(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"20-b.conf": "{}", "10-a.conflist": "{}", "30-c.json": "{}", "05-z.txt": "{}", "README.md": "{}", "99.conflist.bak": "{}",
	})
	if err := os.Mkdir(filepath.Join(dir, "00-dir.conf"), 0o700); err != nil {
		t.Fatal(err)
	}
	got, err := ConfigFiles(dir)
	if want := []string{"10-a.conflist", "20-b.conf", "30-c.json"}; err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("ConfigFiles = %q, %v; want %q", got, err, want)
	}
	if got, err := ConfigFiles(filepath.Join(dir, "missing")); got != nil || err != nil {
		t.Errorf("missing dir: %q, %v", got, err)
	}
}

func TestDecode(t *testing.T) {
	types := func(f *File) (out []string) {
		for _, p := range f.Plugins {
			out = append(out, p.Type)
		}
		return out
	}
	cases := []struct {
		name, data string
		list       bool
		netName    string
		types      []string
		has, main  bool
	}{
		{"conflist", `{"name":"calico","plugins":[{"type":"calico"},{"type":"qoscni","stateDir":"/s"}]}`, true, "calico", []string{"calico", "qoscni"}, true, false},
		{"standalone", `{"name":"q","plugins":[{"type":"qoscni"},{"type":"portmap"}]}`, true, "q", []string{"qoscni", "portmap"}, true, true},
		{"single conf", `{"name":"br","type":"bridge","bridge":"cni0"}`, false, "br", []string{"bridge"}, false, false},
		// An entry's keys match in any case, as libcni decodes an entry.
		{"entry type case", `{"name":"x","plugins":[{"type":"flannel"},{"Type":"qoscni"}]}`, true, "x", []string{"flannel", "qoscni"}, true, false},
		// The file's own keys match exactly, as libcni reads them.
		{"top key case", `{"Name":"x","Plugins":[{"type":"qoscni"}],"type":"bridge"}`, false, "", []string{"bridge"}, false, false},
		{"odd entries", `{"name":"x","plugins":[1,"qoscni",{"type":7},{}]}`, true, "x", []string{"", "", "", ""}, false, false},
		{"name not a string", `{"name":5,"type":"qoscni"}`, false, "", []string{"qoscni"}, true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			data := []byte(tc.data)
			f, err := Decode("p", data)
			if err != nil {
				t.Fatal(err)
			}
			if f.Path != "p" || f.List != tc.list || f.Name != tc.netName || !reflect.DeepEqual(types(f), tc.types) ||
				f.HasQoscni() != tc.has || f.MainIsQoscni() != tc.main {
				t.Errorf("got %+v (types %q, has %v, main %v)", f, types(f), f.HasQoscni(), f.MainIsQoscni())
			}
			if string(data) != tc.data {
				t.Errorf("Decode changed its input:\n%s", data)
			}
		})
	}
	for _, bad := range []string{`[]`, `null`, `5`, `{"name":`, `{"name":"x","plugins":{}}`, `{"name":"x","plugins":null}`, `{} {}`} {
		if f, err := Decode("p", []byte(bad)); err == nil {
			t.Errorf("%s decoded: %+v", bad, f)
		}
	}
}

// TestDecodeKeepsRaw: an entry is kept as written, for the editor and
// for the entry's own plugin.
func TestDecodeKeepsRaw(t *testing.T) {
	data := []byte(`{"name":"n","plugins":[{"type":"x","mtu":1500.0,"k":{"a":[1]}},{"type":"qoscni","stateDir":"/s","ipam":{"type":"qoscni"}}]}`)
	f, err := Decode("p", data)
	if err != nil {
		t.Fatal(err)
	}
	if string(f.Plugins[0].Raw) != `{"type":"x","mtu":1500.0,"k":{"a":[1]}}` {
		t.Errorf("raw entry %s", f.Plugins[0].Raw)
	}
	entries, errs := f.Qoscni()
	if len(errs) != 0 || len(entries) != 1 || entries[0].StateDir != "/s" || !bytes.Equal(entries[0].IPAM, []byte(`{"type":"qoscni"}`)) {
		t.Errorf("qoscni entries %+v, %v", entries, errs)
	}
}

// TestReadDirSkips: what libcni would not load is reported and skipped,
// the rest comes in libcni's order.
func TestReadDirSkips(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"10-a.conflist":  `{"name":"a","plugins":[{"type":"qoscni"}]}`,
		"20-bad.conf":    `{"name":5,"type":"qoscni"}`,
		"30-broken.json": `{"name":`,
		"40-b.conf":      `{"name":"b","type":"bridge"}`,
	})
	files, errs := ReadDir(dir)
	if len(files) != 2 || files[0].Name != "a" || files[1].Name != "b" || files[1].Path != filepath.Join(dir, "40-b.conf") {
		t.Errorf("files %+v", files)
	}
	if len(errs) != 2 || !strings.Contains(errs[0].Error(), "20-bad.conf") || !strings.Contains(errs[1].Error(), "30-broken.json") {
		t.Errorf("errs %v", errs)
	}
}
