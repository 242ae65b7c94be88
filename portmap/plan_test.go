package portmap

import (
	"bytes"
	"net"
	"reflect"
	"testing"

	"github.com/qoscni/qoscni/internal/cni/netconf"
)

var (
	pod4 = net.ParseIP("10.1.0.5").To4()
	pod6 = net.ParseIP("fd00::5")
)

// planFor is what the plugin does with runtime portMappings: netconf
// accepts them for the pod's families, Plan places them on its addresses.
func planFor(t *testing.T, in []netconf.PortMapping, podIPs []net.IP) []Mapping {
	t.Helper()
	ports, err := netconf.ParsePortMappings(in, netconf.FamiliesOf(podIPs))
	if err != nil {
		t.Fatal(err)
	}
	return Plan(ports, podIPs)
}

func TestPlanFamilies(t *testing.T) {
	in := []netconf.PortMapping{
		{HostPort: 80, ContainerPort: 8080, Protocol: "TCP"},
		{HostPort: 53, ContainerPort: 53, Protocol: "Udp", HostIP: "192.168.1.1"},
		{HostPort: 53, ContainerPort: 53, Protocol: "udp", HostIP: "2001:db8::1"},
		{HostPort: 443, ContainerPort: 443, HostIP: "0.0.0.0"},
		{HostPort: 444, ContainerPort: 443, HostIP: "::"},
		{HostPort: 80, ContainerPort: 8080, Protocol: "tcp"}, // exact duplicate
	}
	got := planFor(t, in, []net.IP{pod4, pod6})
	want := []Mapping{
		{80, 8080, "tcp", nil, pod4},
		{80, 8080, "tcp", nil, pod6},
		{53, 53, "udp", net.ParseIP("192.168.1.1").To4(), pod4},
		{53, 53, "udp", net.ParseIP("2001:db8::1"), pod6},
		{443, 443, "tcp", nil, pod4},
		{444, 443, "tcp", nil, pod6},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Plan:\n got %v\nwant %v", got, want)
	}

	// A v4-only pod: IPv6 hostIPs are skipped, any-address gives one mapping.
	got = planFor(t, in, []net.IP{pod4})
	for _, m := range got {
		if m.IPv6() {
			t.Errorf("v4-only pod got %v", m)
		}
	}
	if len(got) != 3 {
		t.Errorf("v4-only pod: %v", got)
	}

	// Standalone ADD accepts the entries before the pod has addresses,
	// for either family; placed on a v4-only pod they give the same.
	ports, err := netconf.ParsePortMappings(in, netconf.BothFamilies)
	if err != nil {
		t.Fatal(err)
	}
	if again := Plan(ports, []net.IP{pod4}); !reflect.DeepEqual(again, got) {
		t.Errorf("accepted for both families, placed on a v4 pod:\n got %v\nwant %v", again, got)
	}
}

func TestKeyEncoding(t *testing.T) {
	m := Mapping{HostPort: 8080, ContainerPort: 80, Protocol: "udp", PodIP: pod4}
	if got, want := elemKey(m), []byte{17, 0, 0, 0, 0x1f, 0x90, 0, 0}; !bytes.Equal(got, want) {
		t.Errorf("any v4 key %x, want %x", got, want)
	}
	if got, want := elemValue(m), []byte{10, 1, 0, 5, 0, 80, 0, 0}; !bytes.Equal(got, want) {
		t.Errorf("v4 target %x, want %x", got, want)
	}
	m.HostIP = net.ParseIP("192.168.1.1").To4()
	if got, want := elemKey(m), []byte{192, 168, 1, 1, 17, 0, 0, 0, 0x1f, 0x90, 0, 0}; !bytes.Equal(got, want) {
		t.Errorf("hostIP v4 key %x, want %x", got, want)
	}
	m6 := Mapping{HostPort: 443, ContainerPort: 8443, Protocol: "sctp", HostIP: net.ParseIP("2001:db8::1"), PodIP: pod6}
	k := elemKey(m6)
	if len(k) != int(typeHostKey6.Bytes) || !bytes.Equal(k[16:], []byte{132, 0, 0, 0, 0x01, 0xbb, 0, 0}) {
		t.Errorf("hostIP v6 key %x", k)
	}
	if v := elemValue(m6); len(v) != int(typeTarget6.Bytes) || targetString(true, v) != "[fd00::5]:8443" {
		t.Errorf("v6 target %x = %s", v, targetString(true, v))
	}
	if h := hairpinKey(pod4); len(h) != int(typePair4.Bytes) {
		t.Errorf("hairpin key %x", h)
	}
	l := newLayout()
	for _, tc := range []struct {
		m    Mapping
		set  string
		klen uint32
	}{
		{Mapping{Protocol: "tcp", PodIP: pod4}, setAny4, typeAnyKey.Bytes},
		{Mapping{Protocol: "tcp", PodIP: pod6}, setAny6, typeAnyKey.Bytes},
		{Mapping{Protocol: "tcp", PodIP: pod4, HostIP: pod4}, setHostIP4, typeHostKey4.Bytes},
		{Mapping{Protocol: "tcp", PodIP: pod6, HostIP: pod6}, setHostIP6, typeHostKey6.Bytes},
	} {
		s := l.mapFor(tc.m)
		if s.Name != tc.set || uint32(len(elemKey(tc.m))) != tc.klen || uint32(len(elemValue(tc.m))) != s.DataType.Bytes {
			t.Errorf("%v: set %s key %d bytes", tc.m, s.Name, len(elemKey(tc.m)))
		}
		back, ok := mappingOf(s, elemKey(tc.m))
		if !ok || back.Protocol != "tcp" || back.IPv6() != tc.m.IPv6() || (tc.m.HostIP != nil) != (back.HostIP != nil) {
			t.Errorf("mappingOf(%s) = %v, %v", s.Name, back, ok)
		}
	}
}

func TestStateRoundTrip(t *testing.T) {
	maps := planFor(t, []netconf.PortMapping{
		{HostPort: 80, ContainerPort: 8080, Protocol: "tcp"},
		{HostPort: 53, ContainerPort: 53, Protocol: "udp", HostIP: "192.168.1.1"},
	}, []net.IP{pod4, pod6})
	back, err := FromState(ToState(maps))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, maps) {
		t.Fatalf("round trip:\n got %v\nwant %v", back, maps)
	}
}

func TestRulesStable(t *testing.T) {
	// The base check compares rule comments; they must be unique per chain.
	seen := map[string]bool{}
	for _, r := range newLayout().rules() {
		k := r.chain.Name + "|" + r.comment
		if seen[k] {
			t.Fatalf("duplicate rule comment %q", k)
		}
		seen[k] = true
	}
}
