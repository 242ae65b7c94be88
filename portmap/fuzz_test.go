package portmap_test

import (
	"encoding/json"
	"errors"
	"net"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/portmap"
)

// FuzzPlan: runtime portMappings (as JSON, the way they arrive) and the
// pod's addresses (comma-separated) in, through netconf's checks and
// Plan; a CNI error 7 naming the entry, or mappings that are valid, unique per host side, of the pod's families,
// and that survive the trip through the state record that DEL relies on.
func FuzzPlan(f *testing.F) {
	f.Fuzz(func(t *testing.T, mappingsJSON []byte, podIPList string) {
		var in []netconf.PortMapping
		if json.Unmarshal(mappingsJSON, &in) != nil {
			return
		}
		var podIPs []net.IP
		var pod4, pod6 net.IP
		for _, s := range strings.Split(podIPList, ",") {
			ip := net.ParseIP(s)
			if ip == nil {
				continue
			}
			podIPs = append(podIPs, ip)
			if v4 := ip.To4(); v4 != nil && pod4 == nil {
				pod4 = v4
			} else if v4 == nil && pod6 == nil {
				pod6 = ip
			}
		}

		// Standalone ADD has netconf accept the entries before the pod has
		// addresses, for both families, so that bad input is refused before
		// anything changes; the pod's families are fewer, so that check may
		// not be laxer, and what it accepts places the same mappings.
		both, bothErr := netconf.ParsePortMappings(in, netconf.BothFamilies)
		ports, err := netconf.ParsePortMappings(in, netconf.FamiliesOf(podIPs))
		if bothErr != nil {
			requireEntryError(t, bothErr)
		} else if err != nil {
			t.Fatalf("accepted for both families, refused for the pod's: %v", err)
		}
		if err != nil {
			requireEntryError(t, err)
			return
		}
		out := portmap.Plan(ports, podIPs)
		if bothErr == nil {
			if again := portmap.Plan(both, podIPs); !reflect.DeepEqual(again, out) {
				t.Fatalf("accepted for both families, placed differently:\n%v\n%v", again, out)
			}
		}

		type hostSide struct {
			v6    bool
			addr  string
			proto string
			port  uint16
		}
		seen := map[hostSide]bool{}
		for _, m := range out {
			if m.HostPort == 0 || m.ContainerPort == 0 {
				t.Fatalf("mapping with port 0: %+v", m)
			}
			if m.Protocol != "tcp" && m.Protocol != "udp" && m.Protocol != "sctp" {
				t.Fatalf("protocol %q", m.Protocol)
			}
			if !m.PodIP.Equal(pod4) && !m.PodIP.Equal(pod6) {
				t.Fatalf("pod IP %s is not the pod's first address of its family", m.PodIP)
			}
			if m.HostIP != nil && (m.HostIP.IsUnspecified() || (m.HostIP.To4() == nil) != m.IPv6()) {
				t.Fatalf("host IP %s for pod IP %s", m.HostIP, m.PodIP)
			}
			k := hostSide{m.IPv6(), m.HostIP.String(), m.Protocol, m.HostPort}
			if seen[k] {
				t.Fatalf("host side %+v mapped twice", k)
			}
			seen[k] = true
		}
		back, err := portmap.FromState(portmap.ToState(out))
		if err != nil {
			t.Fatalf("state record of accepted mappings unreadable: %v", err)
		}
		if len(out) == 0 {
			out = []portmap.Mapping{}
		}
		if !reflect.DeepEqual(back, out) {
			t.Fatalf("state round trip:\n%v\n%v", out, back)
		}
	})
}

func requireEntryError(t *testing.T, err error) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.HasPrefix(e.Msg, "invalid runtimeConfig.portMappings[") {
		t.Fatalf("want CNI error 7 naming the entry, got %T %v", err, err)
	}
}

// FuzzFromState: DEL and CHECK rebuild mappings from whatever the state
// record holds. No panic; what is accepted is valid and stable.
func FuzzFromState(f *testing.F) {
	f.Fuzz(func(t *testing.T, portsJSON []byte) {
		var ports []state.Port
		if json.Unmarshal(portsJSON, &ports) != nil {
			return
		}
		maps, err := portmap.FromState(ports)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "state port ") {
				t.Fatalf("error does not name the entry: %v", err)
			}
			return
		}
		for _, m := range maps {
			if m.HostPort == 0 || m.ContainerPort == 0 || (m.HostIP != nil && (m.HostIP.To4() == nil) != m.IPv6()) {
				t.Fatalf("accepted %+v", m)
			}
		}
		again, err := portmap.FromState(portmap.ToState(maps))
		if err != nil || !reflect.DeepEqual(again, maps) {
			t.Fatalf("not stable: %v\n%v\n%v", err, maps, again)
		}
	})
}
