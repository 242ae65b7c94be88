package plugin

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/grant"
	"github.com/qoscni/qoscni/internal/journal"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

func quiet() *Plugin { return &Plugin{Log: slog.New(slog.NewTextHandler(io.Discard, nil))} }

func mustParse(t *testing.T, stdin string) *netconf.NetConf {
	t.Helper()
	c, _, err := netconf.Parse([]byte(stdin))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRefusedCallJournaled: a call whose config is refused reaches no
// kernel, and is recorded under the network its stdin named, in the
// journal beside its stateDir, with the refusal's code.
func TestRefusedCallJournaled(t *testing.T) {
	root := t.TempDir()
	stdin := `{"cniVersion":"1.0.0","name":"net1","type":"qoscni","stateDir":"` + filepath.Join(root, "state") + `","mtu":1}`
	funcs := journal.Wrap(quiet().Funcs())
	args := &skel.CmdArgs{ContainerID: "c1", IfName: "eth0", StdinData: []byte(stdin)}
	for _, call := range []func(*skel.CmdArgs) error{funcs.Add, funcs.Check, funcs.Status} {
		var e *types.Error
		if err := call(args); !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "mtu 1") {
			t.Fatalf("want CNI error 7 naming mtu, got %v", err)
		}
	}
	// DEL of a config that is not JSON: nothing names the network, and
	// the call still counts (in the default journal, which this test
	// must not write: so only the returned network is checked).
	n, err := quiet().Funcs().Del(&skel.CmdArgs{StdinData: []byte(`{"name":`)})
	if err == nil || n != (journal.Network{}) {
		t.Errorf("DEL of broken stdin: %+v, %v", n, err)
	}
	recs, bad, err := journal.Drain(filepath.Join(root, "journal"))
	if err != nil || bad != 0 || len(recs) != 3 {
		t.Fatalf("journal: %+v, %d bad, %v", recs, bad, err)
	}
	for i, cmd := range []string{"ADD", "CHECK", "STATUS"} {
		if r := recs[i]; r.Command != cmd || r.Network != "net1" || r.Code != int(types.ErrInvalidNetworkConfig) {
			t.Errorf("record %d: %+v", i, r)
		}
	}
}

// TestPlanPortsOnPodAddresses: the mappings netconf accepted (before the
// pod had addresses) land on the pod's first address of each family.
func TestPlanPortsOnPodAddresses(t *testing.T) {
	conf := mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni","runtimeConfig":{"portMappings":[
		{"hostPort":8080,"containerPort":80},{"hostPort":53,"containerPort":53,"protocol":"UDP","hostIP":"2001:db8::1"}]}}`)
	pod4, pod4b := net.ParseIP("10.0.0.5").To4(), net.ParseIP("10.0.0.6").To4()
	got := planPorts(conf, []net.IP{pod4, pod4b})
	if want := []portmap.Mapping{{HostPort: 8080, ContainerPort: 80, Protocol: "tcp", PodIP: pod4}}; !reflect.DeepEqual(got, want) {
		t.Errorf("v4 pod: %v, want %v", got, want)
	}
	pod6 := net.ParseIP("fd00::5")
	if got := planPorts(conf, []net.IP{pod4, pod6}); len(got) != 3 || got[2].Protocol != "udp" || !got[2].HostIP.Equal(net.ParseIP("2001:db8::1")) {
		t.Errorf("dual-stack pod: %v", got)
	}
	if got := planPorts(mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni"}`), []net.IP{pod4}); len(got) != 0 {
		t.Errorf("no portMappings: %v", got)
	}
}

// TestShapingPlanTakesDRAGrant: with a node capacity, the pod's DRA
// grant (found by its UID beside the registry) is its request and wins
// over its annotation; a grant that does not decode fails ADD naming it.
func TestShapingPlanTakesDRAGrant(t *testing.T) {
	reg := filepath.Join(t.TempDir(), "statedirs")
	p := quiet()
	p.StateRegistry = reg
	conf := mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni","nodeCapacity":{"egress":"1G","ingress":"1G"},
		"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"qoscni.io/egress-bandwidth-request":"100M"}}}`)
	pod := netconf.PodArgs{Namespace: "ns", Name: "web", UID: "7d0e3a52-5a4c-4b6e-9d55-0c1b2f3e4a5b"}
	if err := grant.Write(paths.GrantDirOf(reg), pod.UID, "c1", grant.Grant{Claim: "ns/web-bw", EgressBits: 400_000_000}); err != nil {
		t.Fatal(err)
	}
	_, g, err := p.shapingPlan(conf, pod, 1500)
	if err != nil || g.Egress == nil || g.Egress.RequestBits != 400_000_000 || g.Ingress == nil || g.Ingress.RequestBits != 0 {
		t.Fatalf("guarantee %+v %+v, %v", g.Egress, g.Ingress, err)
	}
	// Another pod, no grant: its annotation.
	if _, g, err = p.shapingPlan(conf, netconf.PodArgs{UID: "8e1f"}, 1500); err != nil || g.Egress.RequestBits != 100_000_000 {
		t.Fatalf("without a grant: %+v, %v", g.Egress, err)
	}
	bad := filepath.Join(paths.GrantDirOf(reg), pod.UID, "c2.json")
	if err := os.WriteFile(bad, []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err = p.shapingPlan(conf, pod, 1500); err == nil || !strings.Contains(err.Error(), bad) {
		t.Fatalf("a grant that does not decode: %v", err)
	}
}

// TestShapingFromConfig: the config's parsed delay budget and ceilings
// reach the plan and the record the agent reshapes from, typed.
func TestShapingFromConfig(t *testing.T) {
	conf := mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni","egressRate":100000000,"egressBurst":800000,
		"maxQueueDelay":"30ms","ceilings":{"maxQueueDelay":"50ms"}}`)
	plan, _, err := (&Plugin{}).shapingPlan(conf, netconf.PodArgs{}, 1500)
	if err != nil || plan.Egress == nil || plan.Egress.MaxQueueDelay != 30*time.Millisecond || plan.Egress.Source != shaping.SourceConfig {
		t.Fatalf("plan %+v, %v", plan.Egress, err)
	}
	d := shapingDefaults(conf)
	if d == nil || d.MaxQueueDelayNs != int64(30*time.Millisecond) || d.EgressRate != 100_000_000 || d.Ceilings == nil ||
		d.Ceilings.MaxQueueDelayNs != int64(50*time.Millisecond) {
		t.Fatalf("record defaults %+v", d)
	}
	// With a node capacity the egress limit becomes the class's ceil, and
	// the capacity is recorded for the agent.
	withCap := mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni","egressRate":100000000,"egressBurst":800000,
		"nodeCapacity":{"egress":"1G"}}`)
	plan, g, err := (&Plugin{}).shapingPlan(withCap, netconf.PodArgs{}, 1500)
	if err != nil || plan.Egress != nil || g.Egress == nil || g.Egress.CeilBits != 100_000_000 || g.Ingress != nil {
		t.Fatalf("with a capacity: plan %+v, guarantee %+v, %v", plan.Egress, g, err)
	}
	if d := shapingDefaults(withCap); d == nil || d.NodeCapacity == nil || d.NodeCapacity.EgressBits != 1_000_000_000 {
		t.Errorf("record defaults with a capacity: %+v", d)
	}
	if d := shapingDefaults(mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni"}`)); d != nil {
		t.Errorf("a config without shaping keys recorded %+v", d)
	}
}
