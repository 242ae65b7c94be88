package cniconf

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/state"
)

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestStateDirs(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		// Chained after another plugin, whose own keys are not ours to decode.
		"10-chained.conflist": `{"cniVersion":"1.0.0","name":"calico","plugins":[
			{"type":"calico","stateDir":7},{"type":"qoscni","stateDir":"/run/q/chained/"},{"type":"portmap"}]}`,
		"20-default.conf":   `{"cniVersion":"1.0.0","name":"std","type":"qoscni","ipam":{"ranges":[[{"subnet":"10.1.0.0/24"}]]}}`,
		"30-again.conflist": `{"cniVersion":"1.0.0","name":"std2","plugins":[{"type":"qoscni","stateDir":"/run/q/chained"}]}`,
		"40-relative.json":  `{"cniVersion":"1.0.0","name":"rel","type":"qoscni","stateDir":"state"}`,
		"50-broken.conf":    `{"name":`,
		"60-other.conflist": `{"cniVersion":"1.0.0","name":"flannel","plugins":[{"type":"flannel","stateDir":"/elsewhere"}]}`,
		"70-badentry.conf":  `{"cniVersion":"1.0.0","name":"bad","type":"qoscni","stateDir":["/x"]}`,
		"README.md":         `{"type":"qoscni","stateDir":"/not/a/config"}`,
	})
	dirs, errs := StateDirs(dir)
	if want := []string{"/run/q/chained", netconf.DefaultStateDir}; !reflect.DeepEqual(dirs, want) {
		t.Errorf("dirs = %q, want %q", dirs, want)
	}
	if len(errs) != 3 { // relative, broken, badentry
		t.Errorf("errs = %v", errs)
	}
	// The one reader serves IPAM as before.
	nets, _ := FindIPAMNetworks(dir)
	if len(nets) != 1 || nets[0].Name != "std" {
		t.Errorf("IPAM networks: %+v", nets)
	}
}

func TestStateSourcesDirs(t *testing.T) {
	base := t.TempDir()
	own := filepath.Join(base, "own")
	fromConf := filepath.Join(base, "conf")
	registered := filepath.Join(base, "registered")
	for _, d := range []string{own, fromConf, registered} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// The agent's own dir reached through a symlink is read once.
	alias := filepath.Join(base, "alias")
	if err := os.Symlink(own, alias); err != nil {
		t.Fatal(err)
	}
	confDir := writeFiles(t, map[string]string{
		"10-a.conflist": `{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"qoscni","stateDir":"` + fromConf + `"}]}`,
		"20-b.conflist": `{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"qoscni","stateDir":"` + alias + `"}]}`,
	})
	reg := filepath.Join(base, "statedirs")
	missing := filepath.Join(base, "not-yet")
	for _, d := range []string{registered, fromConf, missing} {
		if err := state.Register(reg, d); err != nil {
			t.Fatal(err)
		}
	}
	dirs, errs := StateSources{Own: own + "/", ConfDir: confDir, Registry: reg}.Dirs()
	if len(errs) != 0 || len(dirs) != 4 || dirs[0] != own || dirs[1] != fromConf {
		t.Fatalf("dirs = %q, errs = %v", dirs, errs)
	}
	rest := map[string]bool{dirs[2]: true, dirs[3]: true}
	if !rest[registered] || !rest[missing] {
		t.Errorf("registered dirs missing: %q", dirs)
	}
	if dirs, errs := (StateSources{Own: own}).Dirs(); len(errs) != 0 || !reflect.DeepEqual(dirs, []string{own}) {
		t.Errorf("own only: %q %v", dirs, errs)
	}
}

// TestPolicyNetworks: standalone qoscni networks with "policy": {"type":
// "k8s"} only, with their stateDir (the default where absent); a chained
// entry with the key is the plugin's error, not a network here.
func TestPolicyNetworks(t *testing.T) {
	dir := t.TempDir()
	for name, c := range map[string]string{
		"10-a.conflist": `{"cniVersion":"1.1.0","name":"a","plugins":[{"type":"qoscni","stateDir":"/s/a","policy":{"type":"k8s"}}]}`,
		"20-b.conflist": `{"cniVersion":"1.1.0","name":"b","plugins":[{"type":"qoscni","policy":{"type":"k8s"}}]}`,
		"30-c.conflist": `{"cniVersion":"1.1.0","name":"c","plugins":[{"type":"qoscni","stateDir":"/s/c"}]}`,
		"40-d.conflist": `{"cniVersion":"1.1.0","name":"d","plugins":[{"type":"bridge"},{"type":"qoscni","policy":{"type":"k8s"}}]}`,
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	nets, errs := PolicyNetworks(dir)
	if len(errs) > 0 || len(nets) != 2 || nets["a"] != "/s/a" || nets["b"] != netconf.DefaultStateDir {
		t.Fatalf("PolicyNetworks: %v, %v", nets, errs)
	}
}
