package install

import (
	"slices"
	"strings"
	"testing"
)

// TestEditsFollowTheReader: install finds qoscni's entries with the
// agent's reader, so an entry libcni runs as qoscni ("Type" in another
// letter case, as libcni decodes entries) is one install and uninstall
// replace and remove; other entries keep every key and number as written.
func TestEditsFollowTheReader(t *testing.T) {
	primary := []byte(`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"flannel","delegate":{"mtu":1450.0}},{"Type":"qoscni","stateDir":"/old"}]}`)
	if !hasQoscni(primary) {
		t.Fatal("entry with \"Type\" not found")
	}
	entry, err := parseEntry(DefaultChainedPlugin)
	if err != nil {
		t.Fatal(err)
	}
	out, dropped, err := chain(primary, entry)
	if err != nil {
		t.Fatal(err)
	}
	if got := pluginTypes(t, out); !slices.Equal(got, []string{"flannel", "qoscni"}) || len(dropped) != 0 || strings.Contains(string(out), "/old") {
		t.Errorf("chain: %v %v\n%s", got, dropped, out)
	}
	out, empty, err := unchain(primary)
	if err != nil || empty {
		t.Fatal(empty, err)
	}
	if got := pluginTypes(t, out); !slices.Equal(got, []string{"flannel"}) || !strings.Contains(string(out), `"mtu": 1450.0`) {
		t.Errorf("unchain: %v\n%s", got, out)
	}
	// A file libcni would refuse for its name still gives its qoscni
	// entry up to uninstall.
	if !hasQoscni([]byte(`{"cniVersion":"1.0.0","name":7,"plugins":[{"type":"qoscni"}]}`)) {
		t.Error("qoscni entry of a file with a numeric name not found")
	}
	if _, err := parseEntry([]byte(`{"type":"bandwidth"}`)); err == nil {
		t.Error("a bandwidth entry taken for qoscni's")
	}
}
