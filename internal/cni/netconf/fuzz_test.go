package netconf_test

import (
	"encoding/json"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

// The seed corpora live in testdata/fuzz/<FuzzName>/ and run in every
// plain `go test`; test/bench/fuzz.sh runs the fuzzer itself.

// requireCNIError fails unless err carries a *types.Error with one of the
// given codes and a message: skel prints exactly that to the runtime, and
// anything else turns into an opaque code 999.
func requireCNIError(t *testing.T, err error, codes ...uint) *types.Error {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Fatalf("error is %T, not a *types.Error: %v", err, err)
	}
	if e.Code == 0 || strings.TrimSpace(e.Msg) == "" {
		t.Fatalf("CNI error without code or message: %+v", e)
	}
	if !slices.Contains(codes, e.Code) {
		t.Fatalf("CNI error code %d (%s), want one of %v", e.Code, e.Msg, codes)
	}
	return e
}

// checkAccepted asserts what every consumer of a parsed config relies on.
func checkAccepted(t *testing.T, c *netconf.NetConf) {
	t.Helper()
	if !slices.Contains(netconf.SupportedVersions, c.CNIVersion) {
		t.Fatalf("accepted unsupported cniVersion %q", c.CNIVersion)
	}
	if err := netconf.ValidateIfName("bridge", c.Bridge); err != nil {
		t.Fatalf("accepted bridge %q: %v", c.Bridge, err)
	}
	if !strings.HasPrefix(c.StateDir, "/") {
		t.Fatalf("accepted relative stateDir %q", c.StateDir)
	}
	if c.MTU != 0 && (c.MTU < netconf.MinMTU || c.MTU > netconf.MaxMTU) {
		t.Fatalf("accepted mtu %d", c.MTU)
	}
	if c.IsDefaultGateway && !c.IsGateway {
		t.Fatal("isDefaultGateway without isGateway")
	}
	for i, pm := range c.RuntimeConfig.PortMappings {
		if pm.HostPort < 1 || pm.HostPort > 65535 || pm.ContainerPort < 1 || pm.ContainerPort > 65535 {
			t.Fatalf("portMappings[%d]: accepted ports %d->%d", i, pm.HostPort, pm.ContainerPort)
		}
		if pm.Protocol != "tcp" && pm.Protocol != "udp" && pm.Protocol != "sctp" {
			t.Fatalf("portMappings[%d]: protocol %q not normalized", i, pm.Protocol)
		}
	}
	// Guarantees take these as 0 (off) or a Kubernetes bandwidth.
	for field, v := range map[string]uint64{"nodeCapacity.ingress": c.Capacity.IngressBits,
		"nodeCapacity.egress": c.Capacity.EgressBits, "ceilings.maxRequest": c.ShapingCeilings.MaxRequestBits} {
		if v != 0 && (v < shaping.MinRateBits || v > shaping.MaxRateBits) {
			t.Fatalf("accepted %s %d bit/s", field, v)
		}
	}
	builtin := c.IPAM.Type == "" || c.IPAM.Type == "qoscni"
	if c.BuiltinIPAM() && !builtin {
		t.Fatalf("built-in IPAM config decoded for ipam.type %q", c.IPAM.Type)
	}
	if c.BuiltinIPAM() {
		before, _ := json.Marshal(c.IPAMConfig)
		if err := c.IPAMConfig.Validate(); err != nil {
			t.Fatalf("accepted IPAM config fails Validate again: %v", err)
		}
		if after, _ := json.Marshal(c.IPAMConfig); string(before) != string(after) {
			t.Fatalf("IPAM Validate not idempotent:\n%s\n%s", before, after)
		}
	}
}

// fullNetConf marshals every key of a NetConf: the embedded PluginConf's
// MarshalJSON would otherwise be promoted and write only its own keys. A
// field of that name at the top hides the method.
type fullNetConf struct {
	*netconf.NetConf
	MarshalJSON struct{} `json:"-"`
}

// reencode writes an accepted config back to JSON, with the built-in IPAM
// section in its canonical (validated) form and the decoded prevResult,
// neither of which NetConf marshals itself.
func reencode(t *testing.T, c *netconf.NetConf) []byte {
	t.Helper()
	out, err := json.Marshal(fullNetConf{NetConf: c})
	if err != nil {
		t.Fatalf("marshal accepted config: %v", err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("re-read marshalled config: %v", err)
	}
	if c.IPAMConfig != nil {
		if m["ipam"], err = json.Marshal(c.IPAMConfig); err != nil {
			t.Fatalf("marshal ipam: %v", err)
		}
	}
	// Parse consumes the raw prevResult into PrevResult.
	if c.PrevResult != nil {
		if m["prevResult"], err = json.Marshal(c.PrevResult); err != nil {
			t.Fatalf("marshal prevResult: %v", err)
		}
	}
	out, err = json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func FuzzParseNetConf(f *testing.F) {
	f.Fuzz(func(t *testing.T, stdin []byte) {
		c, _, err := netconf.Parse(stdin)
		if err != nil {
			requireCNIError(t, err, types.ErrIncompatibleCNIVersion, types.ErrDecodingFailure, types.ErrInvalidNetworkConfig)
			if c != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		if string(c.Raw) != string(stdin) {
			t.Fatal("Raw is not the exact stdin")
		}
		checkAccepted(t, c)
		if c.PrevResult != nil {
			// Chained ADD prints the previous result on for the runtime.
			out, err := json.Marshal(c.PrevResult)
			if err != nil {
				t.Fatalf("accepted prevResult cannot be printed: %v", err)
			}
			if _, err := version.NewResult(c.CNIVersion, out); err != nil {
				t.Fatalf("accepted prevResult prints as a result the runtime cannot read: %v\n%s", err, out)
			}
		}

		// What was accepted, written back, is accepted again unchanged.
		// Compared as JSON: an empty list and no list are the same config.
		again := reencode(t, c)
		c2, _, err := netconf.Parse(again)
		if err != nil {
			t.Fatalf("re-encoded config rejected: %v\n%s", err, again)
		}
		checkAccepted(t, c2)
		if third := reencode(t, c2); string(third) != string(again) {
			t.Fatalf("re-encoding changed the config:\n%s\n%s", again, third)
		}
	})
}

func FuzzParseArgs(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		a, err := netconf.ParseArgs(s)
		pairs := strings.Split(s, ";")
		malformed := slices.ContainsFunc(pairs, func(p string) bool { return p != "" && !strings.Contains(p, "=") })
		if err != nil {
			requireCNIError(t, err, types.ErrInvalidEnvironmentVariables)
			if !malformed {
				t.Fatalf("rejected although every pair has '=': %v", err)
			}
			return
		}
		if malformed {
			t.Fatalf("accepted a pair without '=': %q", s)
		}
		// Each value is the last one given for its key (runtimes append).
		want := map[string]string{}
		for _, p := range pairs {
			if k, v, ok := strings.Cut(p, "="); ok {
				want[k] = v
			}
		}
		got := map[string]string{
			"K8S_POD_NAMESPACE":          a.Namespace,
			"K8S_POD_NAME":               a.Name,
			"K8S_POD_UID":                a.UID,
			"K8S_POD_INFRA_CONTAINER_ID": a.InfraContainerID,
		}
		for k, v := range got {
			if want[k] != v {
				t.Fatalf("%s = %q, want %q", k, v, want[k])
			}
		}
	})
}

// FuzzRuntimeConfig fuzzes the runtimeConfig object inside an otherwise
// valid config, then runs what ADD does with it before touching the
// kernel: shaping resolution and port planning. Every stage must accept it
// or refuse it with a CNI error (port planning has none left to give).
func FuzzRuntimeConfig(f *testing.F) {
	podIPs := []net.IP{net.ParseIP("10.22.0.5").To4(), net.ParseIP("fd00:22::5")}
	f.Fuzz(func(t *testing.T, runtimeConfig []byte) {
		stdin := `{"cniVersion":"1.1.0","name":"n","type":"qoscni","runtimeConfig":` + string(runtimeConfig) + `}`
		c, _, err := netconf.Parse([]byte(stdin))
		if err != nil {
			requireCNIError(t, err, types.ErrDecodingFailure, types.ErrInvalidNetworkConfig)
			return
		}
		checkAccepted(t, c)

		in := shaping.Inputs{Annotations: c.RuntimeConfig.PodAnnotations}
		if bw := c.RuntimeConfig.Bandwidth; bw != nil {
			in.Runtime = &shaping.Rates{IngressRate: bw.IngressRate, IngressBurst: bw.IngressBurst,
				EgressRate: bw.EgressRate, EgressBurst: bw.EgressBurst}
		}
		if _, err := shaping.Resolve(in, 1500); err != nil {
			requireCNIError(t, err, types.ErrInvalidNetworkConfig)
		}
		// Parse refused what port planning cannot place: it only places.
		maps := portmap.Plan(c.RuntimeConfig.Ports, podIPs)
		if len(maps) > 2*len(c.RuntimeConfig.PortMappings) {
			t.Fatalf("%d mappings from %d entries", len(maps), len(c.RuntimeConfig.PortMappings))
		}
	})
}
