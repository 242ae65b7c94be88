package install

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// --network-policy: k8s writes the key the plugin enforces by, off
// removes it (the default config has it), "" keeps the config's own;
// chained mode ignores it (qoscni refuses the key there); a bad value is
// refused before anything is written.
func TestInstallNetworkPolicy(t *testing.T) {
	enforces := func(n *node) bool {
		t.Helper()
		return installedConf(t, n.read(confPath)).EnforcesPolicy()
	}
	own := []byte(`{"cniVersion":"1.0.0","name":"qoscni","plugins":[{"type":"qoscni","bridge":"qoscni0","isGateway":true,"ipam":{"type":"qoscni"}}]}`)
	for _, c := range []struct {
		name   string
		config []byte
		policy string
		want   bool
	}{
		{"default config, own", nil, PolicyOwn, true},
		{"default config, off", nil, PolicyOff, false},
		{"default config, k8s", nil, PolicyK8s, true},
		{"config without, own", own, PolicyOwn, false},
		{"config without, k8s", own, PolicyK8s, true},
	} {
		n := newNode(t)
		n.install(Options{PodCIDRs: cidrs("10.244.1.0/24"), Config: c.config, NetworkPolicy: c.policy})
		if got := enforces(n); got != c.want {
			t.Errorf("%s: enforces %v, want %v", c.name, got, c.want)
		}
	}
	// Turned off on a node that enforced: the next install rewrites it.
	n := newNode(t)
	n.install(Options{PodCIDRs: cidrs("10.244.1.0/24")})
	n.install(Options{PodCIDRs: cidrs("10.244.1.0/24"), NetworkPolicy: PolicyOff})
	if enforces(n) {
		t.Error("still enforcing after an install with off")
	}

	c := newNode(t)
	c.put("10-calico.conflist")
	c.install(Options{Mode: Chained, NetworkPolicy: PolicyK8s})
	var list struct{ Plugins []map[string]any }
	if err := json.Unmarshal(c.read(filepath.Join(CNIConfDir, "10-calico.conflist")), &list); err != nil {
		t.Fatal(err)
	}
	if q := list.Plugins[len(list.Plugins)-1]; q["type"] != PluginType || q["policy"] != nil {
		t.Errorf("chained: qoscni's entry %v, want one without policy", q)
	}

	b := newNode(t)
	if _, err := Install(t.Context(), Options{Root: b.root, PluginBinary: b.bin, PodCIDRs: cidrs("10.244.1.0/24"), NetworkPolicy: "calico"}); err == nil ||
		!strings.Contains(err.Error(), "--network-policy") {
		t.Errorf("bad value: %v", err)
	}
	if b.exists(confPath) {
		t.Error("a config was written despite the bad value")
	}
}
