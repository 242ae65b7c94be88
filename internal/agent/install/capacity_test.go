package install

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
)

func TestParseNodeCapacity(t *testing.T) {
	for in, want := range map[string]NodeCapacity{
		"":                        {},
		"10G":                     {Ingress: "10G", Egress: "10G"},
		"ingress=10G,egress=500M": {Ingress: "10G", Egress: "500M"},
		"egress=1G":               {Egress: "1G"},
	} {
		got, auto, err := ParseNodeCapacity(in)
		if err != nil || auto || got != want {
			t.Errorf("%q: %+v %v %v, want %+v", in, got, auto, err, want)
		}
	}
	if _, auto, err := ParseNodeCapacity("auto"); !auto || err != nil {
		t.Errorf("auto: %v %v", auto, err)
	}
	for _, bad := range []string{"10Q", "ingress=10G,up=1G", "ingress=", "-1G"} {
		if _, _, err := ParseNodeCapacity(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// installedConf is the plugin's view of the last plugin of an installed
// conflist (qoscni's entry), with the list's cniVersion and name.
func installedConf(t *testing.T, data []byte) *netconf.NetConf {
	t.Helper()
	var list struct {
		CNIVersion string            `json:"cniVersion"`
		Name       string            `json:"name"`
		Plugins    []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		t.Fatal(err)
	}
	var p map[string]any
	_ = json.Unmarshal(list.Plugins[len(list.Plugins)-1], &p)
	p["cniVersion"], p["name"] = list.CNIVersion, list.Name
	stdin, _ := json.Marshal(p)
	conf, _, err := netconf.Parse(stdin)
	if err != nil {
		t.Fatalf("plugin rejects the installed config: %v\n%s", err, stdin)
	}
	return conf
}

// installedCapacity is the plugin's view of the installed config's capacity.
func installedCapacity(t *testing.T, data []byte) shaping.Capacity {
	t.Helper()
	return installedConf(t, data).Capacity
}

// --node-capacity: given, or 95 % of the speed the kernel reports for the
// default route's device (a veth says 10000 Mb/s); refused where there is
// no default route.
func TestInstallNodeCapacity(t *testing.T) {
	n := newNode(t)
	n.install(Options{PodCIDRs: cidrs("10.244.1.0/24"), NodeCapacity: "ingress=2G,egress=1G"})
	if c := installedCapacity(t, n.read(confPath)); c.IngressBits != 2_000_000_000 || c.EgressBits != 1_000_000_000 {
		t.Errorf("given: %+v", c)
	}

	node := testnet.NewNode(t)
	o := Options{PodCIDRs: cidrs("10.244.1.0/24"), NodeCapacity: CapacityAuto, NetnsPath: node.Path}
	if _, err := Install(t.Context(), Options{Root: n.root, PluginBinary: n.bin, PodCIDRs: o.PodCIDRs, NodeCapacity: o.NodeCapacity, NetnsPath: o.NetnsPath}); err == nil ||
		!strings.Contains(err.Error(), "no default route") {
		t.Errorf("auto without a default route: %v", err)
	}
	node.Exec(t, "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1")
	node.Exec(t, "ip", "link", "set", "upl0", "up")
	node.Exec(t, "ip", "link", "set", "upl1", "up")
	node.Exec(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "upl0")
	node.Exec(t, "ip", "route", "add", "default", "via", "192.0.2.254", "dev", "upl0")
	rep := n.install(o)
	if c := installedCapacity(t, n.read(confPath)); c.IngressBits != 9_500_000_000 || c.EgressBits != 9_500_000_000 {
		t.Errorf("auto on a 10000 Mb/s veth: %+v, want 95 %%", c)
	}
	if a := actions(rep); a["nodeCapacity"] != Written {
		t.Errorf("report does not say where the capacity came from: %+v", rep.Changes)
	}
}
