package netconf

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/shaping"
)

func mustParse(t *testing.T, s string) *NetConf {
	t.Helper()
	c, _, err := Parse([]byte(s))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return c
}

func TestDefaults(t *testing.T) {
	c := mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni","isDefaultGateway":true,
		"ipam":{"ranges":[[{"subnet":"10.1.0.0/24"}]]}}`)
	if c.Bridge != DefaultBridge || c.StateDir != DefaultStateDir {
		t.Errorf("defaults: bridge %q stateDir %q", c.Bridge, c.StateDir)
	}
	if !c.IsGateway {
		t.Error("isDefaultGateway must imply isGateway")
	}
	if !c.BuiltinIPAM() || c.Chained() {
		t.Errorf("builtin %v chained %v", c.BuiltinIPAM(), c.Chained())
	}
}

func TestRuntimeConfigAnyCase(t *testing.T) {
	// containerd sends Go field names; the CNI conventions use camelCase.
	for _, body := range []string{
		`{"Bandwidth":{"IngressRate":1000,"IngressBurst":2000,"EgressRate":3000,"EgressBurst":4000},
		  "PortMappings":[{"HostPort":8080,"ContainerPort":80,"Protocol":"TCP","HostIP":"10.0.0.1"}]}`,
		`{"bandwidth":{"ingressRate":1000,"ingressBurst":2000,"egressRate":3000,"egressBurst":4000},
		  "portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"10.0.0.1"}]}`,
		`{"BANDWIDTH":{"INGRESSRATE":1000,"ingressburst":2000,"EgressRate":3000,"egressBURST":4000},
		  "portmappings":[{"HOSTPORT":8080,"containerport":80,"PROTOCOL":"Tcp","hostip":"10.0.0.1"}]}`,
	} {
		c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","runtimeConfig":`+body+`}`)
		bw := c.RuntimeConfig.Bandwidth
		if bw == nil || bw.IngressRate != 1000 || bw.IngressBurst != 2000 || bw.EgressRate != 3000 || bw.EgressBurst != 4000 {
			t.Errorf("bandwidth from %s: %+v", body, bw)
		}
		pm := c.RuntimeConfig.PortMappings
		if len(pm) != 1 || pm[0].HostPort != 8080 || pm[0].ContainerPort != 80 || pm[0].Protocol != "tcp" || pm[0].HostIP != "10.0.0.1" {
			t.Errorf("portMappings from %s: %+v", body, pm)
		}
	}
}

func TestPodAnnotations(t *testing.T) {
	c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"kubernetes.io/ingress-bandwidth":"10M"}}}`)
	if c.RuntimeConfig.PodAnnotations["kubernetes.io/ingress-bandwidth"] != "10M" {
		t.Errorf("annotations: %v", c.RuntimeConfig.PodAnnotations)
	}
}

func TestErrors(t *testing.T) {
	cases := []struct {
		name, conf string
		code       uint
		field      string
	}{
		{"malformed", `{"cniVersion":"1.1.0",`, types.ErrDecodingFailure, ""},
		{"no version", `{"name":"n","type":"qoscni"}`, types.ErrIncompatibleCNIVersion, ""},
		{"old version", `{"cniVersion":"0.2.0","name":"n","type":"qoscni"}`, types.ErrIncompatibleCNIVersion, "0.2.0"},
		{"mtu", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","mtu":100}`, types.ErrInvalidNetworkConfig, "mtu 100"},
		{"mtu type", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","mtu":"x"}`, types.ErrInvalidNetworkConfig, "mtu"},
		{"bridge", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","bridge":"a/b"}`, types.ErrInvalidNetworkConfig, "bridge"},
		{"stateDir", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","stateDir":"rel"}`, types.ErrInvalidNetworkConfig, "stateDir"},
		{"protocol", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":2,"protocol":"icmp"}]}}`, types.ErrInvalidNetworkConfig, "protocol"},
		{"containerPort", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":0}]}}`, types.ErrInvalidNetworkConfig, "containerPort 0"},
		{"ipam subnet", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ipam":{"ranges":[[{"subnet":"nope"}]]}}`, types.ErrInvalidNetworkConfig, "nope"},
		{"ceiling burst", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ceilings":{"maxBurst":8}}`, types.ErrInvalidNetworkConfig, "ceilings.maxBurst 8"},
		{"ceiling queue", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ceilings":{"maxQueueBytes":1}}`, types.ErrInvalidNetworkConfig, "ceilings.maxQueueBytes 1"},
		{"ceiling delay", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ceilings":{"maxQueueDelay":"1h"}}`, types.ErrInvalidNetworkConfig, "ceilings.maxQueueDelay"},
		// Parsed here once; shaping and the agent take it typed.
		{"delay", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","maxQueueDelay":"x"}`, types.ErrInvalidNetworkConfig, `maxQueueDelay "x"`},
		{"delay above ceiling", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","maxQueueDelay":"200ms"}`, types.ErrInvalidNetworkConfig, "above ceilings.maxQueueDelay 100ms"},
		{"capacity unparsable", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","nodeCapacity":{"ingress":"10 gig"}}`, types.ErrInvalidNetworkConfig, `nodeCapacity.ingress "10 gig"`},
		{"capacity negative", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","nodeCapacity":{"egress":"-10G"}}`, types.ErrInvalidNetworkConfig, `nodeCapacity.egress "-10G"`},
		{"capacity below 1k", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","nodeCapacity":{"ingress":"10G","egress":"999"}}`, types.ErrInvalidNetworkConfig, `nodeCapacity.egress "999"`},
		{"capacity above 1P", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","nodeCapacity":{"ingress":"2P"}}`, types.ErrInvalidNetworkConfig, `nodeCapacity.ingress "2P"`},
		{"capacity type", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","nodeCapacity":{"ingress":10000000000}}`, types.ErrInvalidNetworkConfig, "nodeCapacity.ingress"},
		{"ceiling request", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ceilings":{"maxRequest":"1"}}`, types.ErrInvalidNetworkConfig, `ceilings.maxRequest "1"`},
		{"ceiling request unparsable", `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ceilings":{"maxRequest":"fast"}}`, types.ErrInvalidNetworkConfig, `ceilings.maxRequest "fast"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Parse([]byte(tc.conf))
			var e *types.Error
			if !errors.As(err, &e) {
				t.Fatalf("want *types.Error, got %v", err)
			}
			if e.Code != tc.code {
				t.Fatalf("code %d (%s), want %d", e.Code, e.Msg, tc.code)
			}
			if !strings.Contains(e.Msg+" "+e.Details, tc.field) {
				t.Fatalf("message %q lacks %q", e.Msg+" "+e.Details, tc.field)
			}
		})
	}
}

func TestIPAMSelection(t *testing.T) {
	c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ipam":{"type":"host-local","subnet":"10.0.0.0/24"}}`)
	if c.BuiltinIPAM() {
		t.Error("host-local must be delegated")
	}
	c = mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni"}`)
	if c.BuiltinIPAM() {
		t.Error("no ipam section means no built-in IPAM")
	}
	c = mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ipam":{"type":"qoscni","ranges":[[{"subnet":"10.0.0.0/24"}]]}}`)
	if !c.BuiltinIPAM() {
		t.Error("type qoscni is built-in")
	}
}

func TestChainedPrevResult(t *testing.T) {
	c := mustParse(t, `{"cniVersion":"1.0.0","name":"n","type":"qoscni","prevResult":{"cniVersion":"1.0.0",
		"interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"10.0.0.5/24","interface":0}]}}`)
	if !c.Chained() || c.PrevResult == nil {
		t.Fatal("prevResult not decoded")
	}
}

func TestParseArgs(t *testing.T) {
	a, err := ParseArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;K8S_POD_INFRA_CONTAINER_ID=abc")
	if err != nil {
		t.Fatal(err)
	}
	if a.Namespace != "ns" || a.Name != "web-0" || a.UID != "u-1" || a.InfraContainerID != "abc" {
		t.Errorf("%+v", a)
	}
	if _, err := ParseArgs("K8S_POD_NAME"); err == nil {
		t.Error("pair without '=' accepted")
	}
	if a, err := ParseArgs(""); err != nil || a != (PodArgs{}) {
		t.Errorf("empty: %+v %v", a, err)
	}
}

func TestValidateIfName(t *testing.T) {
	for _, ok := range []string{"eth0", "qoscni0", "a", "br-123456789012"} {
		if err := ValidateIfName("f", ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "a b", "a/b", "abcdefghijklmnop"} {
		if err := ValidateIfName("f", bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestCeilingsParsed(t *testing.T) {
	c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","maxQueueDelay":"200ms",
		"ceilings":{"maxQueueDelay":"250ms","maxBurst":8388608,"maxQueueBytes":1048576}}`)
	want := shaping.Ceilings{MaxQueueDelay: 250 * time.Millisecond, MaxBurstBytes: 1 << 20, MaxQueueBytes: 1 << 20}
	if c.ShapingCeilings != want {
		t.Errorf("ceilings %+v, want %+v", c.ShapingCeilings, want)
	}
	if c.QueueDelay != 200*time.Millisecond {
		t.Errorf("maxQueueDelay parsed to %v, want 200ms", c.QueueDelay)
	}
	if c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","maxQueueDelay":" 5ms "}`); c.QueueDelay != 5*time.Millisecond {
		t.Errorf("maxQueueDelay \" 5ms \" parsed to %v", c.QueueDelay)
	}
	if c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni"}`); c.ShapingCeilings != (shaping.Ceilings{}) || c.QueueDelay != 0 {
		t.Errorf("no ceilings in the config: %+v, %v, want the zero values (shaping's defaults)", c.ShapingCeilings, c.QueueDelay)
	}
	c = mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ceilings":{"maxRequest":"2.5G"}}`)
	if c.ShapingCeilings != (shaping.Ceilings{MaxRequestBits: 2_500_000_000}) {
		t.Errorf("maxRequest 2.5G parsed to %+v", c.ShapingCeilings)
	}
	if c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ceilings":{"maxRequest":"0"}}`); c.ShapingCeilings.MaxRequestBits != 0 {
		t.Errorf("maxRequest 0 parsed to %d, want none", c.ShapingCeilings.MaxRequestBits)
	}
}

func TestNodeCapacityParsed(t *testing.T) {
	for _, tc := range []struct {
		json string
		want shaping.Capacity
	}{
		{`"nodeCapacity":{"ingress":"10G","egress":"10G"}`, shaping.Capacity{IngressBits: 10_000_000_000, EgressBits: 10_000_000_000}},
		{`"nodeCapacity":{"ingress":"1k","egress":" 1.5M "}`, shaping.Capacity{IngressBits: 1_000, EgressBits: 1_500_000}},
		{`"nodeCapacity":{"INGRESS":"1P"}`, shaping.Capacity{IngressBits: 1_000_000_000_000_000}},
		// A direction left out or 0 has no hierarchy.
		{`"nodeCapacity":{"egress":"100M"}`, shaping.Capacity{EgressBits: 100_000_000}},
		{`"nodeCapacity":{"ingress":"0","egress":"0G"}`, shaping.Capacity{}},
		{`"nodeCapacity":{}`, shaping.Capacity{}},
		{`"mtu":1500`, shaping.Capacity{}},
	} {
		c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni",`+tc.json+`}`)
		if c.Capacity != tc.want {
			t.Errorf("%s: %+v, want %+v", tc.json, c.Capacity, tc.want)
		}
	}
}

// TestUnknownKeys: keys qoscni does not read are listed (for one warning),
// whatever their letter case; its own keys, the CNI conventions' and those
// of the built-in ipam object are not.
func TestUnknownKeys(t *testing.T) {
	c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","Bridge":"br0","mtu":1500,"args":{},
		"policy":{"type":"k8s"},"kubernetes":{"kubeconfig":"/x"},"datastore_type":"kubernetes","log_level":"info",
		"ipam":{"type":"qoscni","ranges":[[{"subnet":"10.1.0.0/24"}]],"assign_ipv4":"true","ipv4_pools":["default"]},
		"ceilings":{},"nodeCapacity":{},"NodeCapacity2":{},"runtimeConfig":{},"capabilities":{"bandwidth":true}}`)
	want := []string{"NodeCapacity2", "datastore_type", "ipam.ipv4_pools", "kubernetes", "log_level"}
	if strings.Join(c.UnknownKeys, ",") != strings.Join(want, ",") {
		t.Errorf("unknown keys %v, want %v", c.UnknownKeys, want)
	}
	// A delegated ipam object is the delegate's business.
	c = mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","ipam":{"type":"host-local","subnet":"10.0.0.0/24","x":1}}`)
	if len(c.UnknownKeys) != 0 {
		t.Errorf("unknown keys %v, want none", c.UnknownKeys)
	}
}

// TestPolicy: "policy": {"type": "k8s"} turns enforcement on in standalone
// mode; another type, or k8s behind a main plugin, is refused naming
// policy.type.
func TestPolicy(t *testing.T) {
	c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni","policy":{"type":"k8s"}}`)
	if !c.EnforcesPolicy() {
		t.Error("policy k8s not enforced")
	}
	if c := mustParse(t, `{"cniVersion":"1.1.0","name":"n","type":"qoscni"}`); c.EnforcesPolicy() {
		t.Error("no policy object enforces policy")
	}
	for _, bad := range []string{
		`{"cniVersion":"1.1.0","name":"n","type":"qoscni","policy":{"type":"calico"}}`,
		`{"cniVersion":"1.1.0","name":"n","type":"qoscni","policy":{"type":"k8s"},
		  "prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"veth1"}],"ips":[{"address":"10.1.0.2/24","interface":0}]}}`,
	} {
		_, _, err := Parse([]byte(bad))
		if err == nil || !strings.Contains(err.Error(), "policy.type") {
			t.Errorf("%s: %v, want an error naming policy.type", bad, err)
		}
	}
}
