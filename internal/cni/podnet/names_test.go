package podnet

import (
	"regexp"
	"testing"
)

// The matchers accept exactly what the derivation makes: the patterns the
// agent used before the matchers moved here.
func TestNameMatchers(t *testing.T) {
	veth := regexp.MustCompile(`^qv[0-9a-f]{12}$`)
	ifb := regexp.MustCompile(`^qi[0-9a-f]{12}$`)
	names := []string{"", "qv", "qi", "qv0123456789a", "qv0123456789abc", "qv0123456789AB", "qx0123456789ab",
		"eth0", "qoscni0", "qv0123456789a\n", "xqv0123456789ab", "qv01234567-9ab", "qi0123456789ag"}
	for _, id := range []string{"c1", "c2", "0123456789abcdef"} {
		for _, ifn := range []string{"eth0", "net1"} {
			names = append(names, HostVethName(id, ifn), IFBName(id, ifn))
		}
	}
	for _, n := range names {
		if got, want := HostVethNames.MatchString(n), veth.MatchString(n); got != want {
			t.Errorf("HostVethNames(%q) = %v, want %v", n, got, want)
		}
		if got, want := IFBNames.MatchString(n), ifb.MatchString(n); got != want {
			t.Errorf("IFBNames(%q) = %v, want %v", n, got, want)
		}
		if got, want := DeviceNames.MatchString(n), veth.MatchString(n) || ifb.MatchString(n); got != want {
			t.Errorf("DeviceNames(%q) = %v, want %v", n, got, want)
		}
	}
	if !HostVethNames.MatchString(HostVethName("c", "eth0")) || !IFBNames.MatchString(IFBName("c", "eth0")) {
		t.Error("a derived name is not matched")
	}
}
