package install

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/shaping"
)

func TestParseCeilings(t *testing.T) {
	for in, want := range map[string]netconf.CeilingsConfig{
		"":              {},
		"maxRequest=2G": {MaxRequest: "2G"},
		"maxQueueDelay=50ms, maxBurst=8388608,maxQueueBytes=1048576": {MaxQueueDelay: "50ms", MaxBurst: 8388608, MaxQueueBytes: 1048576},
	} {
		if got, err := ParseCeilings(in); err != nil || got != want {
			t.Errorf("%q: %+v %v, want %+v", in, got, err, want)
		}
	}
	// Each refusal names what is wrong.
	for bad, says := range map[string]string{
		"maxRequest":                  "not key=value",
		"maxBurst=8M":                 "maxBurst",
		"maxQueueBytes=1":             "ceilings.maxQueueBytes",
		"maxQueueDelay=1h":            "ceilings.maxQueueDelay",
		"maxRequest=999":              "ceilings.maxRequest",
		"maxQueue=1":                  "not one of",
		"maxRequest=1G,maxRequest=2G": "twice",
	} {
		if _, err := ParseCeilings(bad); err == nil || !strings.Contains(err.Error(), says) {
			t.Errorf("%q: %v, want an error saying %q", bad, err, says)
		}
	}
}

// installedCeilings is the plugin's view (0: the default) of the
// installed config's ceilings.
func installedCeilings(t *testing.T, data []byte) shaping.Ceilings {
	t.Helper()
	return installedConf(t, data).ShapingCeilings
}

// --ceilings writes its keys over the config's, keeps the config's others,
// in both modes; a bad value stops the install before any config is
// written.
func TestInstallCeilings(t *testing.T) {
	own := []byte(`{"cniVersion":"1.0.0","name":"qoscni","plugins":[{"type":"qoscni","bridge":"qoscni0","isGateway":true,
		"ceilings":{"maxQueueBytes":1048576,"maxQueueDelay":"80ms"},"ipam":{"type":"qoscni"}}]}`)
	n := newNode(t)
	n.install(Options{PodCIDRs: cidrs("10.244.1.0/24"), Config: own, Ceilings: "maxQueueDelay=50ms,maxRequest=2G"})
	want := shaping.Ceilings{MaxQueueDelay: 50 * time.Millisecond, MaxQueueBytes: 1048576, MaxRequestBits: 2_000_000_000}
	if got := installedCeilings(t, n.read(confPath)); got != want {
		t.Errorf("standalone: %+v, want %+v", got, want)
	}

	c := newNode(t)
	c.put("10-calico.conflist")
	c.install(Options{Mode: Chained, Ceilings: "maxBurst=8388608"})
	want = shaping.Ceilings{MaxBurstBytes: 1 << 20} // 0: the default
	if got := installedCeilings(t, c.read(filepath.Join(CNIConfDir, "10-calico.conflist"))); got != want {
		t.Errorf("chained: %+v, want %+v", got, want)
	}

	b := newNode(t)
	if _, err := Install(t.Context(), Options{Root: b.root, PluginBinary: b.bin, PodCIDRs: cidrs("10.244.1.0/24"), Ceilings: "maxQueueDelay=1h"}); err == nil ||
		!strings.Contains(err.Error(), "ceilings.maxQueueDelay") {
		t.Errorf("bad ceiling: %v", err)
	}
	if b.exists(confPath) {
		t.Error("a config was written despite the bad ceiling")
	}
	// Each ceiling is good, but the config's own delay budget is above the
	// new one: the plugin would refuse every ADD, so the install refuses.
	budget := []byte(`{"cniVersion":"1.0.0","name":"qoscni","plugins":[{"type":"qoscni","bridge":"qoscni0","maxQueueDelay":"30ms","ipam":{"type":"qoscni"}}]}`)
	if _, err := Install(t.Context(), Options{Root: b.root, PluginBinary: b.bin, PodCIDRs: cidrs("10.244.1.0/24"), Config: budget, Ceilings: "maxQueueDelay=20ms"}); err == nil ||
		!strings.Contains(err.Error(), "maxQueueDelay") || !strings.Contains(err.Error(), "plugin would refuse") {
		t.Errorf("ceiling below the config's budget: %v", err)
	}
	if b.exists(confPath) {
		t.Error("a config was written the plugin would refuse")
	}
	before := c.read(filepath.Join(CNIConfDir, "10-calico.conflist"))
	if _, err := Install(t.Context(), Options{Root: c.root, PluginBinary: c.bin, Mode: Chained, Config: []byte(`{"type":"qoscni","maxQueueDelay":"30ms"}`), Ceilings: "maxQueueDelay=20ms"}); err == nil ||
		!strings.Contains(err.Error(), "maxQueueDelay") {
		t.Errorf("chained, ceiling below the entry's budget: %v", err)
	}
	if after := c.read(filepath.Join(CNIConfDir, "10-calico.conflist")); string(after) != string(before) {
		t.Errorf("the primary's conflist changed though the install refused:\n%s", after)
	}
}
