package nodenet

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/qoscni/qoscni/internal/testnet"
)

// newRoutedCluster makes three nodes: node-1 and node-2 on one bridge
// (192.168.50.0/24, fd50::/64), node-3 on another (192.168.52.0/24,
// fd52::/64), and a router namespace between the two bridges, so that
// node-3 is reachable from the others but not on-link. Pod CIDRs as in
// newCluster; pod interfaces get MTU 1450 (underlay 1500 - VXLAN).
func newRoutedCluster(t testing.TB, mode Mode) *cluster {
	t.Helper()
	testnet.RequireRoot(t)
	c := &cluster{client: fake.NewClientset(), mode: mode}
	router := testnet.NewNS(t, "qr")
	router.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	router.Exec(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	nets := []struct{ v4, v6 string }{{"192.168.50", "fd50::"}, {"192.168.52", "fd52::"}}
	var segs []*testnet.NS
	for i, nw := range nets {
		seg := testnet.NewNS(t, "qb")
		seg.Exec(t, "ip", "link", "add", "br0", "type", "bridge")
		seg.Exec(t, "ip", "link", "set", "br0", "up")
		leg := fmt.Sprintf("eth%d", i)
		seg.Exec(t, "ip", "link", "add", "r0", "type", "veth", "peer", "name", leg, "netns", router.Name)
		seg.Exec(t, "ip", "link", "set", "r0", "master", "br0", "up")
		router.Exec(t, "ip", "addr", "add", nw.v4+".254/24", "dev", leg)
		router.Exec(t, "ip", "addr", "add", nw.v6+"fe/64", "dev", leg, "nodad")
		router.Exec(t, "ip", "link", "set", leg, "up")
		segs = append(segs, seg)
	}
	for i := 1; i <= 3; i++ {
		s := 0
		if i == 3 {
			s = 1
		}
		n := &clusterNode{
			Node: testnet.NewNode(t), name: fmt.Sprintf("node-%d", i),
			ip4:   net.ParseIP(fmt.Sprintf("%s.%d", nets[s].v4, i)).To4(),
			ip6:   net.ParseIP(fmt.Sprintf("%s%d", nets[s].v6, i)),
			cidr4: fmt.Sprintf("10.50.%d.0/24", i), cidr6: fmt.Sprintf("fd51:0:0:%d::/64", i),
			mtu: 1500 - VXLANOverhead,
		}
		c.addNode(t, segs[s], n, fmt.Sprintf("n%d", i))
		o := nets[1-s]
		n.Exec(t, "ip", "route", "add", o.v4+".0/24", "via", nets[s].v4+".254")
		n.Exec(t, "ip", "-6", "route", "add", o.v6+"/64", "via", nets[s].v6+"fe")
	}
	return c
}

func firstAddr(cidr string) string {
	_, ipn, _ := net.ParseCIDR(cidr)
	return ipn.IP.String()
}

// hasVXLAN says whether n has exactly: host-gw routes to the nodes in
// hostgw; routes over the VXLAN device to those in vx, with their
// neighbour and FDB entries; and no VXLAN device when vx is empty.
func hasVXLAN(t testing.TB, n *clusterNode, hostgw, vx []*clusterNode) (bool, string) {
	t.Helper()
	rts, err := n.h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	l, lerr := n.h.LinkByName(VXLANDevice)
	vxIdx := -1
	if lerr == nil {
		vxIdx = l.Attrs().Index
	}
	var got, want []string
	for _, rt := range rts {
		s := rt.Dst.String() + " via " + rt.Gw.String()
		if rt.LinkIndex == vxIdx {
			s += " vx"
		}
		got = append(got, s)
	}
	for _, p := range hostgw {
		want = append(want, p.cidr4+" via "+p.ip4.String(), p.cidr6+" via "+p.ip6.String())
	}
	for _, p := range vx {
		mac := VTEPMAC(p.ip4).String()
		want = append(want, p.cidr4+" via "+firstAddr(p.cidr4)+" vx", p.cidr6+" via "+firstAddr(p.cidr6)+" vx",
			"neigh "+firstAddr(p.cidr4)+" "+mac, "neigh "+firstAddr(p.cidr6)+" "+mac, "fdb "+mac+" "+p.ip4.String())
	}
	if lerr == nil {
		for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
			ns, err := n.h.NeighList(vxIdx, fam)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range ns {
				if e.State&netlink.NUD_PERMANENT != 0 {
					got = append(got, "neigh "+e.IP.String()+" "+e.HardwareAddr.String())
				}
			}
		}
		fdb, err := n.h.NeighList(vxIdx, unix.AF_BRIDGE)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range fdb {
			if e.IP != nil {
				got = append(got, "fdb "+e.HardwareAddr.String()+" "+e.IP.String())
			}
		}
		if len(vx) == 0 {
			got = append(got, "device "+VXLANDevice)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	g, w := strings.Join(got, "; "), strings.Join(want, "; ")
	return g == w, fmt.Sprintf("%s has\n  %s\nwant\n  %s", n.name, g, w)
}

func settleIPv6(t *testing.T, c *cluster) {
	t.Helper()
	for _, n := range c.nodes {
		for _, ns := range []*testnet.NS{n.NS, n.pod} {
			eventually(t, 5*time.Second, "IPv6 addresses settled in "+ns.Name, func() (bool, string) {
				out, err := ns.Try("ip", "-6", "addr", "show", "tentative")
				return err == nil && strings.TrimSpace(out) == "", out
			})
		}
	}
}

func pingAll(t *testing.T, c *cluster) {
	t.Helper()
	for _, from := range c.nodes {
		for _, to := range c.nodes {
			if from == to {
				continue
			}
			for _, dst := range []net.IP{to.pod4, to.pod6} {
				if err := ping(from.pod, dst); err != nil {
					t.Errorf("%s -> %s: %v", from.name, to.name, err)
				}
			}
		}
	}
}

func TestVXLANAutoKernel(t *testing.T) {
	c := newRoutedCluster(t, ModeAuto)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	ns := []*clusterNode{n1, n2, n3}
	if err := ping(n1.pod, n3.pod4); err == nil {
		t.Fatal("pods reach each other across the router before any route exists: the test proves nothing")
	}
	for _, n := range ns {
		c.start(t, n, 200*time.Millisecond)
	}
	want := func(n *clusterNode, hostgw, vx []*clusterNode) {
		t.Helper()
		eventually(t, 5*time.Second, "state of "+n.name, func() (bool, string) { return hasVXLAN(t, n, hostgw, vx) })
	}
	want(n1, []*clusterNode{n2}, []*clusterNode{n3})
	want(n2, []*clusterNode{n1}, []*clusterNode{n3})
	want(n3, nil, []*clusterNode{n1, n2})
	for _, n := range ns {
		got, err := c.client.CoreV1().Nodes().Get(context.Background(), n.name, metav1.GetOptions{})
		if err != nil || got.Annotations[VTEPMACAnnotation] != VTEPMAC(n.ip4).String() {
			t.Errorf("%s: annotation %v (%v), want %s", n.name, got.Annotations, err, VTEPMAC(n.ip4))
		}
		if l, err := n.h.LinkByName(VXLANDevice); err != nil || l.Attrs().MTU != 1450 {
			t.Errorf("%s: %s %v", n.name, VXLANDevice, err)
		} else if vx := l.(*netlink.Vxlan); vx.VxlanId != VXLANVNI || vx.Port != VXLANPort || vx.Learning || !vx.SrcAddr.Equal(n.ip4) {
			t.Errorf("%s: device %+v", n.name, vx)
		}
	}
	settleIPv6(t, c)
	pingAll(t, c)

	// Source addresses kept across the tunnel, both ways, both families.
	const port = 7078
	for _, n := range ns {
		echoServer(t, n.pod, port)
	}
	for _, pair := range [][2]*clusterNode{{n1, n3}, {n3, n2}, {n1, n2}} {
		from, to := pair[0], pair[1]
		for _, ips := range [][2]net.IP{{to.pod4, from.pod4}, {to.pod6, from.pod6}} {
			eventually(t, 3*time.Second, "source kept towards "+ips[0].String(), func() (bool, string) {
				got, err := seenAs(t, from.pod, ips[0], port)
				return err == nil && got == ips[1].String(), fmt.Sprintf("server saw %q (%v), want %s", got, err, ips[1])
			})
		}
	}

	// Drift: an FDB entry, a neighbour and a VXLAN route deleted by hand
	// come back with the periodic pass.
	mac3 := VTEPMAC(n3.ip4).String()
	n1.Exec(t, "bridge", "fdb", "del", mac3, "dev", VXLANDevice, "dst", n3.ip4.String())
	n1.Exec(t, "ip", "neigh", "del", firstAddr(n3.cidr6), "dev", VXLANDevice)
	n2.Exec(t, "ip", "route", "del", n3.cidr4)
	n2.Exec(t, "ip", "neigh", "replace", firstAddr(n3.cidr4), "lladdr", "0a:51:00:00:00:99", "dev", VXLANDevice, "nud", "permanent")
	start := time.Now()
	want(n1, []*clusterNode{n2}, []*clusterNode{n3})
	want(n2, []*clusterNode{n1}, []*clusterNode{n3})
	t.Logf("VXLAN drift repaired in %v", time.Since(start).Round(time.Millisecond))
	for _, from := range []*clusterNode{n1, n2} {
		for _, dst := range []net.IP{n3.pod4, n3.pod6} {
			if err := ping(from.pod, dst); err != nil {
				t.Errorf("after repair: %v", err)
			}
		}
	}

	// node-3 leaves: nothing needs VXLAN any more on node-1 and node-2.
	if err := c.client.CoreV1().Nodes().Delete(context.Background(), n3.name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want(n1, []*clusterNode{n2}, nil)
	want(n2, []*clusterNode{n1}, nil)
	if _, err := n1.h.LinkByName(VXLANDevice); err == nil {
		t.Errorf("%s still on node-1 with no peer behind a router", VXLANDevice)
	}
	if err := ping(n1.pod, n2.pod4); err != nil {
		t.Error(err)
	}
	if v := metricOf(t, n1.reg, "qoscni_nodenet_reconcile_errors_total", "routes"); v != 0 {
		t.Errorf("reconcile errors = %v", v)
	}
}

func TestVXLANModeKernel(t *testing.T) {
	c := newRoutedCluster(t, ModeVXLAN)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	for _, n := range c.nodes {
		c.start(t, n, 200*time.Millisecond)
	}
	want := func(n *clusterNode, vx ...*clusterNode) {
		t.Helper()
		eventually(t, 5*time.Second, "state of "+n.name, func() (bool, string) { return hasVXLAN(t, n, nil, vx) })
	}
	want(n1, n2, n3)
	want(n2, n1, n3)
	want(n3, n1, n2)
	settleIPv6(t, c)
	pingAll(t, c)

	// node-3 leaves: its route, neighbour and FDB entries go, node-2's stay.
	if err := c.client.CoreV1().Nodes().Delete(context.Background(), n3.name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want(n1, n2)
	want(n2, n1)
	for _, dst := range []net.IP{n2.pod4, n2.pod6} {
		if err := ping(n1.pod, dst); err != nil {
			t.Error(err)
		}
	}
	if err := ping(n1.pod, n3.pod4); err == nil {
		t.Error("node-3's pods still reachable after its Node was deleted")
	}
}

// TestVXLANReconcileKernel: the device is made as specified, a pass with
// nothing changed changes nothing, an outdated device is made again, an
// unused one is deleted and a foreign link of the same name left alone.
func TestVXLANReconcileKernel(t *testing.T) {
	n, h := vethNode(t)
	n.Exec(t, "ip", "route", "add", "10.200.0.0/16", "via", "192.168.60.254")
	self := peer("a", []string{"192.168.60.1", "fd60::1"}, "10.70.1.0/24", "fd70:0:0:1::/64")
	b := peer("b", []string{"192.168.60.2", "fd60::2"}, "10.70.2.0/24", "fd70:0:0:2::/64")
	c := peer("c", []string{"10.200.0.3"}, "10.70.3.0/24", "fd70:0:0:3::/64")
	b.VTEPMAC, c.VTEPMAC = VTEPMAC(b.InternalIPs[0]), VTEPMAC(c.InternalIPs[0])
	r := NewRoutesMode(h, "a", ModeAuto)
	res, err := r.Reconcile([]Peer{self, b, c})
	if err != nil {
		t.Fatal(err)
	}
	if res.Added != 4 || res.Installed != 4 || res.NeighFDB != 3 || !res.VTEPCreated || res.VTEPMTU != 1450 ||
		res.VTEPMAC.String() != "0a:51:c0:a8:3c:01" {
		t.Errorf("first pass %+v", res)
	}
	out := n.Exec(t, "ip", "-d", "link", "show", VXLANDevice)
	for _, s := range []string{"vxlan id 4242", "local 192.168.60.1", "dev eth0", "dstport 4789", "nolearning", "mtu 1450", "0a:51:c0:a8:3c:01"} {
		if !strings.Contains(out, s) {
			t.Errorf("device lacks %q:\n%s", s, out)
		}
	}
	if out := n.Exec(t, "bridge", "fdb", "show", "dev", VXLANDevice); !strings.Contains(out, "0a:51:0a:c8:00:03 dst 10.200.0.3 self permanent") {
		t.Errorf("fdb:\n%s", out)
	}
	if res, err = r.Reconcile([]Peer{self, b, c}); err != nil || res.Added+res.Replaced+res.Deleted+res.NeighFDB != 0 || res.VTEPCreated {
		t.Errorf("steady pass: %+v %v", res, err)
	}
	// Edited by hand: learning on; a stray permanent neighbour and FDB entry.
	n.Exec(t, "ip", "link", "set", VXLANDevice, "type", "vxlan", "learning")
	n.Exec(t, "ip", "neigh", "add", "10.9.9.9", "lladdr", "0a:51:00:00:00:09", "dev", VXLANDevice, "nud", "permanent")
	if res, err = r.Reconcile([]Peer{self, b, c}); err != nil || !res.VTEPCreated || res.Installed != 4 {
		t.Errorf("outdated device pass: %+v %v", res, err)
	}
	if out := n.Exec(t, "ip", "neigh", "show", "dev", VXLANDevice, "nud", "permanent"); strings.Contains(out, "10.9.9.9") ||
		strings.Count(out, "lladdr 0a:51:0a:c8:00:03") != 2 {
		t.Errorf("neighbours:\n%s", out)
	}
	n.Exec(t, "bridge", "fdb", "append", "0a:51:00:00:00:09", "dev", VXLANDevice, "dst", "192.168.60.9", "self", "permanent")
	if res, err = r.Reconcile([]Peer{self, b, c}); err != nil || res.NeighFDB != 1 {
		t.Errorf("stray FDB pass: %+v %v", res, err)
	}
	// c gone: nothing needs VXLAN, the device goes.
	if res, err = r.Reconcile([]Peer{self, b}); err != nil || res.Installed != 2 {
		t.Errorf("c gone: %+v %v", res, err)
	}
	if _, err := h.LinkByName(VXLANDevice); err == nil {
		t.Error("unused device kept")
	}
	// A foreign link of that name is never touched.
	n.Exec(t, "ip", "link", "add", VXLANDevice, "type", "bridge")
	res, err = r.Reconcile([]Peer{self, b, c})
	if err == nil || !strings.Contains(err.Error(), "not a VXLAN device") || res.Installed != 2 {
		t.Errorf("foreign link: %+v %v", res, err)
	}
	if out := n.Exec(t, "ip", "-d", "link", "show", VXLANDevice); !strings.Contains(out, "bridge") {
		t.Errorf("foreign link changed:\n%s", out)
	}
}
