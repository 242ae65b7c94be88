package podnet

import (
	"net"
	"testing"
)

func cidr(s string) net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return *n
}

func TestPrefixInterval(t *testing.T) {
	iv := prefixInterval(cidr("10.1.2.0/24"))
	if net.IP(iv.lo).String() != "10.1.2.0" || net.IP(iv.hi).String() != "10.1.3.0" {
		t.Errorf("v4: %v-%v", net.IP(iv.lo), net.IP(iv.hi))
	}
	iv = prefixInterval(cidr("fd00::/64"))
	if net.IP(iv.lo).String() != "fd00::" || net.IP(iv.hi).String() != "fd00:0:0:1::" {
		t.Errorf("v6: %v-%v", net.IP(iv.lo), net.IP(iv.hi))
	}
	if iv := prefixInterval(cidr("ff00::/8")); iv.hi != nil {
		t.Errorf("top of space must be open-ended, got %v", net.IP(iv.hi))
	}
	if iv := prefixInterval(cidr("240.0.0.0/4")); iv.hi != nil {
		t.Errorf("top of v4 space must be open-ended, got %v", net.IP(iv.hi))
	}
}

func TestOverlaps(t *testing.T) {
	a := prefixInterval(cidr("10.0.0.0/16"))
	cases := []struct {
		b    string
		want bool
	}{{"10.0.5.0/24", true}, {"10.1.0.0/24", false}, {"9.255.255.0/24", false}, {"0.0.0.0/0", true}, {"240.0.0.0/4", false}}
	for _, c := range cases {
		if got := a.overlaps(prefixInterval(cidr(c.b))); got != c.want {
			t.Errorf("10.0.0.0/16 overlaps %s = %v", c.b, got)
		}
	}
	top := prefixInterval(cidr("240.0.0.0/4"))
	if !top.overlaps(prefixInterval(cidr("250.0.0.0/8"))) {
		t.Error("open-ended interval must overlap a prefix inside it")
	}
}

func TestDeviceNames(t *testing.T) {
	seen := map[string]bool{}
	for _, id := range []string{"a", "b", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"} {
		for _, ifn := range []string{"eth0", "net1"} {
			for _, n := range []string{HostVethName(id, ifn), IFBName(id, ifn)} {
				if len(n) > 15 {
					t.Errorf("%s longer than IFNAMSIZ-1", n)
				}
				if seen[n] {
					t.Errorf("collision: %s", n)
				}
				seen[n] = true
			}
		}
	}
	if HostVethName("a", "eth0") != HostVethName("a", "eth0") {
		t.Error("names must be deterministic")
	}
}

func TestBridgeMAC(t *testing.T) {
	m := bridgeMAC("qoscni0")
	if m[0]&0x02 == 0 || m[0]&0x01 != 0 {
		t.Errorf("%s is not locally administered unicast", m)
	}
	if m.String() != bridgeMAC("qoscni0").String() || m.String() == bridgeMAC("other").String() {
		t.Error("bridge MAC must be stable per name and differ between names")
	}
}
