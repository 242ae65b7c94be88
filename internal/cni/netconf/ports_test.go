package netconf

import (
	"errors"
	"net"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// TestPortMappingErrors: every refusal of a portMappings entry is code 7
// naming the entry, decided here once (portmap only places what passed).
func TestPortMappingErrors(t *testing.T) {
	cases := []struct {
		name string
		in   PortMapping
		msg  string
	}{
		{"hostPort 0", PortMapping{HostPort: 0, ContainerPort: 1}, "runtimeConfig.portMappings[1].hostPort 0"},
		{"hostPort big", PortMapping{HostPort: 65536, ContainerPort: 1}, "runtimeConfig.portMappings[1].hostPort 65536"},
		{"containerPort", PortMapping{HostPort: 1, ContainerPort: 70000}, "runtimeConfig.portMappings[1].containerPort 70000"},
		{"protocol", PortMapping{HostPort: 1, ContainerPort: 1, Protocol: "icmp"}, `runtimeConfig.portMappings[1].protocol "icmp"`},
		{"hostIP", PortMapping{HostPort: 1, ContainerPort: 1, HostIP: "10.0.0.300"}, `invalid runtimeConfig.portMappings[1].hostIP "10.0.0.300": not an IP address`},
		{"clash", PortMapping{HostPort: 80, ContainerPort: 81}, "invalid runtimeConfig.portMappings[1] hostPort 80/tcp on 0.0.0.0: already mapped to containerPort 80 by runtimeConfig.portMappings[0]"},
		{"clash v6", PortMapping{HostPort: 80, ContainerPort: 81, HostIP: "::"}, "hostPort 80/tcp on [::]: already mapped"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := []PortMapping{{HostPort: 80, ContainerPort: 80}, tc.in}
			_, err := ParsePortMappings(in, BothFamilies)
			var e *types.Error
			if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig {
				t.Fatalf("want CNI error 7, got %v", err)
			}
			if !strings.Contains(e.Msg, tc.msg) {
				t.Fatalf("message %q lacks %q", e.Msg, tc.msg)
			}
			if in[1] != tc.in {
				t.Errorf("the caller's entries changed: %+v", in[1])
			}
		})
	}
}

// TestPortMappingsAtParse: Parse refuses a bad hostIP and a clash before
// ADD changes anything, and a clash only counts in a family the pod may
// have: both before IPAM answers, those of prevResult behind a main plugin.
func TestPortMappingsAtParse(t *testing.T) {
	const base = `{"cniVersion":"1.0.0","name":"n","type":"qoscni",`
	clash6 := `"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"hostIP":"2001:db8::1"},{"hostPort":80,"containerPort":81,"hostIP":"2001:db8::1"}]}`
	for _, bad := range []string{
		base + `"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"hostIP":"nope"}]}}`,
		base + clash6 + `}`,
	} {
		if _, _, err := Parse([]byte(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
	prev4 := `"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.5/24"}]},`
	c := mustParse(t, base+prev4+clash6+`}`)
	if len(c.RuntimeConfig.Ports) != 0 {
		t.Errorf("IPv6 entries kept for an IPv4-only pod: %+v", c.RuntimeConfig.Ports)
	}
}

func TestParsePortMappings(t *testing.T) {
	in := []PortMapping{
		{HostPort: 80, ContainerPort: 8080, Protocol: "TCP"},
		{HostPort: 53, ContainerPort: 53, Protocol: "Udp", HostIP: " 192.168.1.1 "},
		{HostPort: 443, ContainerPort: 443, HostIP: "::"},
		{HostPort: 80, ContainerPort: 8080, HostIP: "0.0.0.0"}, // the first entry's v4 side again
		{HostPort: 80, ContainerPort: 8080},                    // all of the first entry again
	}
	got, err := ParsePortMappings(in, BothFamilies)
	if err != nil {
		t.Fatal(err)
	}
	want := []Port{
		{80, 8080, "tcp", nil, true, true},
		{53, 53, "udp", net.ParseIP("192.168.1.1").To4(), true, false},
		{443, 443, "tcp", nil, false, true},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got  %+v\nwant %+v", got, want)
	}
	// A v4-only pod: the v6 entry has nothing to map.
	if got, _ := ParsePortMappings(in, Families{V4: true}); len(got) != 2 || got[0].V6 || got[1].V6 {
		t.Errorf("v4-only pod: %+v", got)
	}
	if f := FamiliesOf([]net.IP{net.ParseIP("10.0.0.1"), net.ParseIP("::ffff:10.0.0.2")}); f != (Families{V4: true}) {
		t.Errorf("FamiliesOf v4 (and v4-mapped) = %+v", f)
	}
}
