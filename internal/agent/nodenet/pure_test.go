package nodenet

import (
	"net"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func mustCIDR(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

func node(name string, podCIDRs []string, addrs ...corev1.NodeAddress) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	n.Spec.PodCIDRs = podCIDRs
	if len(podCIDRs) > 0 {
		n.Spec.PodCIDR = podCIDRs[0]
	}
	n.Status.Addresses = addrs
	return n
}

func internal(ip string) corev1.NodeAddress {
	return corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip}
}

func TestPeerFromNode(t *testing.T) {
	n := node("a", []string{"10.1.0.0/24", "fd01::/64"},
		internal("192.168.0.1"), internal("fd00::1"),
		corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: "203.0.113.1"},
		corev1.NodeAddress{Type: corev1.NodeHostName, Address: "a"},
		internal("not-an-ip"), internal("192.168.0.1"))
	p := PeerFromNode(n)
	if got := p.String(); got != "a ips=[192.168.0.1 fd00::1] podCIDRs=[10.1.0.0/24 fd01::/64]" {
		t.Errorf("peer = %s", got)
	}
	if len(p.InternalIPs[0]) != net.IPv4len || len(p.PodCIDRs[0].IP) != net.IPv4len || len(p.PodCIDRs[0].Mask) != net.IPv4len {
		t.Error("IPv4 values must be in 4-byte form")
	}

	// Only the older single field set (clusters before dual-stack).
	old := node("b", nil, internal("192.168.0.2"))
	old.Spec.PodCIDR = "10.2.0.0/24"
	if got := PeerFromNode(old).PodCIDRs; len(got) != 1 || got[0].String() != "10.2.0.0/24" {
		t.Errorf("podCIDR fallback: %v", got)
	}
	// podCIDRs wins over podCIDR; a bad entry is left out, not fatal.
	both := node("c", []string{"10.3.0.0/24", "bogus"})
	both.Spec.PodCIDR = "10.9.0.0/24"
	if got := PeerFromNode(both).PodCIDRs; len(got) != 1 || got[0].String() != "10.3.0.0/24" {
		t.Errorf("podCIDRs: %v", got)
	}
	if !PeerFromNode(n).Equal(p) || PeerFromNode(n).Equal(PeerFromNode(old)) {
		t.Error("Equal")
	}
}

func peer(name string, ips []string, cidrs ...string) Peer {
	p := Peer{Name: name}
	for _, ip := range ips {
		p.InternalIPs = append(p.InternalIPs, normIP(net.ParseIP(ip)))
	}
	for _, c := range cidrs {
		p.PodCIDRs = append(p.PodCIDRs, mustCIDR(c))
	}
	return p
}

func show(routes []Route, skipped []Skipped) string {
	var b strings.Builder
	for _, r := range routes {
		b.WriteString(r.Dst.String() + ">" + r.Via.String() + " ")
	}
	b.WriteString("|")
	for _, s := range skipped {
		b.WriteString(" " + s.Peer + ":" + s.Dst.String() + ":" + s.Reason)
	}
	return b.String()
}

func TestDesired(t *testing.T) {
	allOnLink := func(net.IP) (bool, string, string) { return true, "", "" }
	// 192.168.9.0/24 stands for a peer behind a router.
	lan := func(ip net.IP) (bool, string, string) {
		if mustCIDR("192.168.9.0/24").Contains(ip) {
			return false, ReasonNotOnLink, "via router"
		}
		return true, "", ""
	}
	cases := []struct {
		name   string
		self   string
		peers  []Peer
		onLink OnLink
		want   string
	}{
		{"self excluded, both families", "a", []Peer{
			peer("a", []string{"192.168.0.1", "fd00::1"}, "10.1.0.0/24", "fd01::/64"),
			peer("b", []string{"192.168.0.2", "fd00::2"}, "10.2.0.0/24", "fd02::/64"),
		}, allOnLink, "10.2.0.0/24>192.168.0.2 fd02::/64>fd00::2 |"},
		{"no IPv6 InternalIP", "a", []Peer{
			peer("b", []string{"192.168.0.2"}, "10.2.0.0/24", "fd02::/64"),
			peer("c", nil, "10.3.0.0/24"),
			peer("d", []string{"fd00::4"}),
		}, allOnLink, "10.2.0.0/24>192.168.0.2 | b:fd02::/64:NoInternalIP c:10.3.0.0/24:NoInternalIP"},
		{"not on-link, second address taken", "a", []Peer{
			peer("b", []string{"192.168.9.2"}, "10.2.0.0/24"),
			peer("c", []string{"192.168.9.3", "192.168.0.3"}, "10.3.0.0/24"),
		}, lan, "10.3.0.0/24>192.168.0.3 | b:10.2.0.0/24:NotOnLink"},
		{"conflicts: own CIDR, first peer by name wins", "a", []Peer{
			peer("z", []string{"192.168.0.26"}, "10.2.0.0/25"),
			peer("a", []string{"192.168.0.1"}, "10.1.0.0/24"),
			peer("b", []string{"192.168.0.2"}, "10.2.0.0/24", "10.1.0.128/25"),
		}, allOnLink, "10.2.0.0/24>192.168.0.2 | b:10.1.0.128/25:CIDRConflict z:10.2.0.0/25:CIDRConflict"},
		{"no self object", "x", []Peer{
			peer("b", []string{"192.168.0.2"}, "10.2.0.0/24"),
		}, allOnLink, "10.2.0.0/24>192.168.0.2 |"},
	}
	for _, c := range cases {
		if got := show(Desired(c.self, c.peers, c.onLink)); got != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.name, got, c.want)
		}
	}
}

func TestClusterCIDRs(t *testing.T) {
	got := ClusterCIDRs([]Peer{peer("a", nil, "10.1.0.0/24", "fd01::/64"), peer("b", nil), peer("c", nil, "10.3.0.0/24")})
	if len(got) != 3 || got[0].String() != "10.1.0.0/24" || got[1].String() != "fd01::/64" || got[2].String() != "10.3.0.0/24" {
		t.Errorf("ClusterCIDRs = %v", got)
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"": ModeOff, "off": ModeOff, "hostgw": ModeHostGW} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %q, %v", in, got, err)
		}
	}
	for _, m := range []Mode{ModeVXLAN, ModeAuto} {
		if got, err := ParseMode(string(m)); err != nil || got != m {
			t.Errorf("ParseMode(%q) = %q, %v", m, got, err)
		}
	}
	if _, err := ParseMode("geneve"); err == nil {
		t.Error("unknown mode accepted")
	}
}

func TestDesiredMode(t *testing.T) {
	lan := func(ip net.IP) (bool, string, string) {
		switch {
		case mustCIDR("192.168.9.0/24").Contains(ip), mustCIDR("fd09::/64").Contains(ip):
			return false, ReasonNotOnLink, "via router"
		case ip.Equal(net.ParseIP("192.168.0.66")):
			return false, ReasonNoRoute, "none"
		}
		return true, "", ""
	}
	mac := func(p Peer, s string) Peer { p.VTEPMAC, _ = net.ParseMAC(s); return p }
	self := peer("a", []string{"192.168.0.1", "fd00::1"}, "10.1.0.0/24", "fd01::/64")
	b := mac(peer("b", []string{"192.168.0.2", "fd00::2"}, "10.2.0.0/24", "fd02::/64"), "0a:51:00:00:00:02")
	c := mac(peer("c", []string{"192.168.9.3", "fd09::3"}, "10.3.0.0/24", "fd03::/64"), "0a:51:00:00:00:03")
	d := peer("d", []string{"192.168.9.4"}, "10.4.0.0/24")                            // no MAC yet
	e := mac(peer("e", []string{"192.168.0.66"}, "10.6.0.0/24"), "0a:51:00:00:00:06") // unreachable
	vx := func(rs []Route) string {
		var s []string
		for _, r := range rs {
			if r.VXLAN {
				s = append(s, r.Dst.String()+">"+r.Via.String()+"@"+r.MAC.String()+"/"+r.Underlay.String())
			} else {
				s = append(s, r.Dst.String()+">"+r.Via.String())
			}
		}
		return strings.Join(s, " ")
	}
	pl := DesiredMode("a", []Peer{self, b, c, d}, ModeAuto, lan)
	if got, want := vx(pl.Routes), "10.2.0.0/24>192.168.0.2 10.3.0.0/24>10.3.0.0@0a:51:00:00:00:03/192.168.9.3 fd02::/64>fd00::2 fd03::/64>fd03::@0a:51:00:00:00:03/192.168.9.3"; got != want {
		t.Errorf("auto:\n got %s\nwant %s", got, want)
	}
	if !pl.NeedVTEP || !pl.Local.Equal(net.ParseIP("192.168.0.1")) || show(nil, pl.Skipped) != "| d:10.4.0.0/24:NoVTEPMAC" {
		t.Errorf("auto: need %v local %v skipped %s", pl.NeedVTEP, pl.Local, show(nil, pl.Skipped))
	}
	// Auto picks per peer: a peer behind a router without an IPv6
	// InternalIP has its IPv6 CIDR carried over the IPv4 underlay too.
	f := mac(peer("f", []string{"192.168.9.6"}, "10.6.0.0/24", "fd06::/64"), "0a:51:00:00:00:06")
	if got, want := vx(DesiredMode("a", []Peer{self, f}, ModeAuto, lan).Routes), "10.6.0.0/24>10.6.0.0@0a:51:00:00:00:06/192.168.9.6 fd06::/64>fd06::@0a:51:00:00:00:06/192.168.9.6"; got != want {
		t.Errorf("auto per peer:\n got %s\nwant %s", got, want)
	}
	// All on-link in auto: no device needed.
	if pl := DesiredMode("a", []Peer{self, b}, ModeAuto, lan); pl.NeedVTEP || len(pl.Routes) != 2 {
		t.Errorf("auto on-link: %+v", pl)
	}
	// vxlan forces every peer; an unreachable underlay is skipped.
	pl = DesiredMode("a", []Peer{self, b, c, e}, ModeVXLAN, lan)
	if got, want := vx(pl.Routes), "10.2.0.0/24>10.2.0.0@0a:51:00:00:00:02/192.168.0.2 10.3.0.0/24>10.3.0.0@0a:51:00:00:00:03/192.168.9.3 fd02::/64>fd02::@0a:51:00:00:00:02/192.168.0.2 fd03::/64>fd03::@0a:51:00:00:00:03/192.168.9.3"; got != want {
		t.Errorf("vxlan:\n got %s\nwant %s", got, want)
	}
	if show(nil, pl.Skipped) != "| e:10.6.0.0/24:NoIPv4Underlay" {
		t.Errorf("vxlan skipped %s", show(nil, pl.Skipped))
	}
	// No IPv4 InternalIP of its own: nothing over VXLAN.
	pl = DesiredMode("a", []Peer{peer("a", []string{"fd00::1"}), c}, ModeVXLAN, lan)
	if len(pl.Routes) != 0 || show(nil, pl.Skipped) != "| c:10.3.0.0/24:NoIPv4Underlay c:fd03::/64:NoIPv4Underlay" {
		t.Errorf("no local: %s", show(pl.Routes, pl.Skipped))
	}
	// hostgw never uses VXLAN.
	if pl := DesiredMode("a", []Peer{self, c}, ModeHostGW, lan); pl.NeedVTEP || len(pl.Routes) != 0 {
		t.Errorf("hostgw: %+v", pl)
	}
	if got := VTEPMAC(net.ParseIP("192.168.50.1")).String(); got != "0a:51:c0:a8:32:01" {
		t.Errorf("VTEPMAC = %s", got)
	}
	n := node("c", []string{"10.3.0.0/24"}, internal("192.168.9.3"))
	n.Annotations = map[string]string{VTEPMACAnnotation: "0a:51:00:00:00:03"}
	if p := PeerFromNode(n); p.VTEPMAC.String() != "0a:51:00:00:00:03" || p.Equal(PeerFromNode(node("c", []string{"10.3.0.0/24"}, internal("192.168.9.3")))) {
		t.Errorf("annotation not read: %v", p)
	}
	n.Annotations[VTEPMACAnnotation] = "garbage"
	if p := PeerFromNode(n); p.VTEPMAC != nil {
		t.Errorf("bad MAC accepted: %v", p.VTEPMAC)
	}
}
