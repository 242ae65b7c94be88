package nodenet

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/testnet"
)

// handleIn opens a netlink handle in a namespace, closed at cleanup.
func handleIn(t testing.TB, ns *testnet.NS) (*netlink.Handle, int) {
	t.Helper()
	fd, err := unix.Open(ns.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s: %v", ns.Path, err)
	}
	h, err := netlink.NewHandleAt(vnetns.NsHandle(fd))
	if err != nil {
		unix.Close(fd)
		t.Fatalf("netlink in %s: %v", ns.Name, err)
	}
	t.Cleanup(func() {
		h.Close()
		unix.Close(fd)
	})
	return h, fd
}

// routeTable is dst -> "gw proto" of the main table, both families, with
// the kernel's own (connected, local, multicast) routes left out.
func routeTable(t testing.TB, h *netlink.Handle) map[string]string {
	t.Helper()
	rts, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatalf("list routes: %v", err)
	}
	out := map[string]string{}
	for _, rt := range rts {
		if rt.Dst == nil || rt.Protocol == unix.RTPROT_KERNEL || rt.Gw == nil {
			continue
		}
		out[rt.Dst.String()] = fmt.Sprintf("%s %d", rt.Gw, rt.Protocol)
	}
	return out
}

func showTable(m map[string]string) string {
	var l []string
	for k, v := range m {
		l = append(l, k+" via "+v)
	}
	sort.Strings(l)
	return strings.Join(l, "; ")
}

// eventually polls cond until it holds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last state: %s", what, timeout, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// vethNode is a node namespace whose "eth0" (one end of a veth pair, the
// other end up in the same namespace) holds 192.168.60.1/24 and fd60::1/64.
func vethNode(t *testing.T) (*testnet.Node, *netlink.Handle) {
	t.Helper()
	n := testnet.NewNode(t)
	n.Exec(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
	n.Exec(t, "ip", "link", "set", "eth0p", "up")
	n.Exec(t, "ip", "link", "set", "eth0", "up")
	n.Exec(t, "ip", "addr", "add", "192.168.60.1/24", "dev", "eth0")
	n.Exec(t, "ip", "addr", "add", "fd60::1/64", "dev", "eth0", "nodad")
	h, _ := handleIn(t, n.NS)
	return n, h
}

func TestRoutesReconcileKernel(t *testing.T) {
	n, h := vethNode(t)
	// A router on the segment, and networks behind it.
	n.Exec(t, "ip", "route", "add", "10.200.0.0/16", "via", "192.168.60.254")
	// Foreign routes: one elsewhere, one holding a CIDR a peer will claim.
	n.Exec(t, "ip", "route", "add", "10.99.0.0/24", "via", "192.168.60.9", "proto", "static")
	n.Exec(t, "ip", "route", "add", "10.70.5.0/24", "via", "192.168.60.9", "proto", "static")

	self := peer("a", []string{"192.168.60.1", "fd60::1"}, "10.70.1.0/24", "fd70:0:0:1::/64")
	b := peer("b", []string{"192.168.60.2", "fd60::2"}, "10.70.2.0/24", "fd70:0:0:2::/64")
	c := peer("c", []string{"10.200.0.3"}, "10.70.3.0/24")                      // behind the router
	d := peer("d", []string{"192.168.60.4"}, "10.70.4.0/24", "fd70:0:0:4::/64") // no IPv6 address
	e := peer("e", []string{"192.168.60.5"}, "10.70.5.0/24")                    // foreign route there
	r := NewRoutes(h, "a")

	res, err := r.Reconcile([]Peer{self, b, c, d, e})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"10.70.2.0/24": "192.168.60.2 81", "fd70:0:0:2::/64": "fd60::2 81", "10.70.4.0/24": "192.168.60.4 81",
		"10.99.0.0/24": "192.168.60.9 4", "10.70.5.0/24": "192.168.60.9 4", "10.200.0.0/16": "192.168.60.254 3",
	}
	if got := routeTable(t, h); showTable(got) != showTable(want) {
		t.Errorf("routes:\n got %s\nwant %s", showTable(got), showTable(want))
	}
	if res.Added != 3 || res.Installed != 3 || res.Deleted != 0 || res.Replaced != 0 {
		t.Errorf("result %+v", res)
	}
	reasons := map[string]string{}
	for _, s := range res.Skipped {
		reasons[s.Peer+" "+s.Dst.String()] = s.Reason
		t.Logf("skipped: %s", s)
	}
	wantReasons := map[string]string{"c 10.70.3.0/24": ReasonNotOnLink, "d fd70:0:0:4::/64": ReasonNoAddress, "e 10.70.5.0/24": ReasonForeignHeld}
	if fmt.Sprint(reasons) != fmt.Sprint(wantReasons) {
		t.Errorf("skipped %v, want %v", reasons, wantReasons)
	}

	// Nothing changed: nothing done.
	if res, err = r.Reconcile([]Peer{self, b, c, d, e}); err != nil || res.Added+res.Replaced+res.Deleted != 0 || res.Installed != 3 {
		t.Errorf("second pass: %+v %v", res, err)
	}

	// b moved to another address; one of ours edited by hand to another
	// gateway; a stray route of ours at another metric; d left.
	b.InternalIPs = []net.IP{net.ParseIP("192.168.60.20").To4(), net.ParseIP("fd60::2")}
	n.Exec(t, "ip", "-6", "route", "replace", "fd70:0:0:2::/64", "via", "fd60::99", "proto", "81")
	n.Exec(t, "ip", "-6", "route", "add", "fd70:0:0:2::/64", "via", "fd60::98", "proto", "81", "metric", "50")
	res, err = r.Reconcile([]Peer{self, b, c, e})
	if err != nil {
		t.Fatal(err)
	}
	want = map[string]string{
		"10.70.2.0/24": "192.168.60.20 81", "fd70:0:0:2::/64": "fd60::2 81",
		"10.99.0.0/24": "192.168.60.9 4", "10.70.5.0/24": "192.168.60.9 4", "10.200.0.0/16": "192.168.60.254 3",
	}
	if got := routeTable(t, h); showTable(got) != showTable(want) {
		t.Errorf("after changes:\n got %s\nwant %s", showTable(got), showTable(want))
	}
	if res.Replaced != 2 || res.Deleted != 2 || res.Added != 0 || res.Installed != 2 {
		t.Errorf("result %+v", res)
	}
	if out := n.Exec(t, "ip", "-6", "route", "show", "fd70:0:0:2::/64"); strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Errorf("more than one route left for fd70:0:0:2::/64:\n%s", out)
	}

	// All peers gone: only foreign routes remain.
	if res, err = r.Reconcile([]Peer{self}); err != nil || res.Installed != 0 {
		t.Errorf("empty: %+v %v", res, err)
	}
	want = map[string]string{"10.99.0.0/24": "192.168.60.9 4", "10.70.5.0/24": "192.168.60.9 4", "10.200.0.0/16": "192.168.60.254 3"}
	if got := routeTable(t, h); showTable(got) != showTable(want) {
		t.Errorf("after removal:\n got %s\nwant %s", showTable(got), showTable(want))
	}
}

// cluster is nodes joined by a bridge in its own namespace (the L2
// segment), each with a pod made by the plugin.
type cluster struct {
	client *fake.Clientset
	nodes  []*clusterNode
	mode   Mode // of the agents ("" = hostgw)
}

type clusterNode struct {
	*testnet.Node
	name       string
	ip4, ip6   net.IP // InternalIPs
	cidr4      string // pod CIDRs
	cidr6      string
	h          *netlink.Handle // the test's own, for checks
	fd         int
	pod        *testnet.NS
	pod4, pod6 net.IP
	mtu        int // of the pod interfaces (0 = the plugin's default)
	reg        *prometheus.Registry
	stop       func()
}

func (c *clusterNode) object() *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: c.name}}
	n.Spec.PodCIDR = c.cidr4
	n.Spec.PodCIDRs = []string{c.cidr4, c.cidr6}
	n.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeHostName, Address: c.name},
		{Type: corev1.NodeInternalIP, Address: c.ip4.String()},
		{Type: corev1.NodeInternalIP, Address: c.ip6.String()},
	}
	return n
}

func conflist(n *clusterNode) []byte {
	c := map[string]any{
		"cniVersion": "1.0.0", "name": "qnodenet", "type": "qoscni", "bridge": "qbr0",
		"isDefaultGateway": true, "ipMasq": true, "stateDir": n.StateDir,
		"ipam": map[string]any{
			"ranges":  []any{[]any{map[string]any{"subnet": n.cidr4}}, []any{map[string]any{"subnet": n.cidr6}}},
			"dataDir": n.IPAMDir,
		},
	}
	if n.mtu != 0 {
		c["mtu"] = n.mtu
	}
	b, _ := json.Marshal(c)
	return b
}

// newCluster makes count nodes on one segment (192.168.50.0/24,
// fd50::/64) with pod CIDRs 10.50.<i>.0/24 and fd51:0:0:<i>::/64, a pod
// on each, and Node objects for all in a fake clientset. No agent yet.
func newCluster(t testing.TB, count int) *cluster {
	t.Helper()
	testnet.RequireRoot(t)
	seg := testnet.NewNS(t, "qb")
	seg.Exec(t, "ip", "link", "add", "br0", "type", "bridge")
	seg.Exec(t, "ip", "link", "set", "br0", "up")
	c := &cluster{client: fake.NewClientset()}
	for i := 1; i <= count; i++ {
		n := &clusterNode{
			Node: testnet.NewNode(t), name: fmt.Sprintf("node-%d", i),
			ip4: net.IPv4(192, 168, 50, byte(i)).To4(), ip6: net.ParseIP(fmt.Sprintf("fd50::%d", i)),
			cidr4: fmt.Sprintf("10.50.%d.0/24", i), cidr6: fmt.Sprintf("fd51:0:0:%d::/64", i),
		}
		c.addNode(t, seg, n, fmt.Sprintf("n%d", i))
	}
	return c
}

// addNode plugs n into the bridge br0 of seg through port, makes its pod
// and its Node object.
func (c *cluster) addNode(t testing.TB, seg *testnet.NS, n *clusterNode, port string) {
	t.Helper()
	seg.Exec(t, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", n.Name)
	seg.Exec(t, "ip", "link", "set", port, "master", "br0", "up")
	n.Exec(t, "ip", "addr", "add", n.ip4.String()+"/24", "dev", "eth0")
	n.Exec(t, "ip", "addr", "add", n.ip6.String()+"/64", "dev", "eth0", "nodad")
	n.Exec(t, "ip", "link", "set", "eth0", "up")
	n.h, n.fd = handleIn(t, n.NS)

	n.pod = n.NewPod(t)
	cid := testnet.Unique("c")
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: cid, Netns: n.pod.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p" + port + ";K8S_POD_UID=uid-" + cid, Config: conflist(n)}).MustSucceed(t, "ADD on "+n.name)
	res := &current.Result{}
	if err := json.Unmarshal(r.Stdout, res); err != nil {
		t.Fatalf("decode ADD result: %v\n%s", err, r.Stdout)
	}
	for _, ip := range res.IPs {
		if ip.Address.IP.To4() != nil {
			n.pod4 = ip.Address.IP.To4()
		} else {
			n.pod6 = ip.Address.IP
		}
	}
	if n.pod4 == nil || n.pod6 == nil {
		t.Fatalf("pod on %s: want an IPv4 and an IPv6 address, got %s", n.name, r.Stdout)
	}
	if _, err := c.client.CoreV1().Nodes().Create(context.Background(), n.object(), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.nodes = append(c.nodes, n)
}

// start runs node n's agent part (StartAgent, as the agent's main does).
func (c *cluster) start(t testing.TB, n *clusterNode, resync time.Duration) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", n.name)
	n.reg = prometheus.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	mode := c.mode
	if mode == "" {
		mode = ModeHostGW
	}
	stop, err := StartAgent(ctx, AgentConfig{Mode: mode, Client: c.client, NodeName: n.name, NetnsFd: n.fd,
		Resync: resync, Registerer: n.reg, Logger: log})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	var once sync.Once
	n.stop = func() { once.Do(func() { cancel(); stop() }) }
	t.Cleanup(n.stop)
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// inNS runs fn on a thread switched into ns: sockets made there belong to
// ns for their whole life, whichever thread uses them later.
func inNS(t testing.TB, ns *testnet.NS, fn func() error) error {
	t.Helper()
	runtime.LockOSThread()
	orig, err := vnetns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := vnetns.GetFromPath(ns.Path)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := vnetns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := vnetns.Set(orig); err != nil {
		// The thread stays locked and dies with the goroutine.
		return fmt.Errorf("return to own netns: %w", err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// echoServer listens on port in ns (both families) and answers every
// connection with the peer address it sees, until the test ends.
func echoServer(t testing.TB, ns *testnet.NS, port int) {
	t.Helper()
	var ln net.Listener
	if err := inNS(t, ns, func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", port))
		return err
	}); err != nil {
		t.Fatalf("listen in %s: %v", ns.Name, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
			if ip := net.ParseIP(host); ip != nil && ip.To4() != nil {
				host = ip.To4().String() // v4-mapped on the dual-stack socket
			}
			_, _ = io.WriteString(conn, host+"\n")
			conn.Close()
		}
	}()
}

// seenAs connects from ns to addr:port and returns the address the server
// saw as the source.
func seenAs(t testing.TB, ns *testnet.NS, addr net.IP, port int) (string, error) {
	t.Helper()
	var conn net.Conn
	err := inNS(t, ns, func() (err error) {
		conn, err = net.DialTimeout("tcp", net.JoinHostPort(addr.String(), fmt.Sprint(port)), 2*time.Second)
		return err
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSpace(line), err
}

func ping(ns *testnet.NS, addr net.IP) error {
	out, err := ns.Try("ping", "-c", "1", "-W", "2", addr.String())
	if err != nil {
		return fmt.Errorf("ping %s from %s: %v\n%s", addr, ns.Name, err, out)
	}
	return nil
}

// inClusterSet says whether cidr is inside node n's masq-skip-cluster set
// (adjacent CIDRs are merged there, so no textual match).
func inClusterSet(n *clusterNode, cidr string) bool {
	set := "masq-skip-cluster4"
	if strings.Contains(cidr, ":") {
		set = "masq-skip-cluster6"
	}
	_, err := n.Try("nft", "get", "element", "inet", podnet.TableName, set, "{ "+cidr+" }")
	return err == nil
}

// hasRoutes says whether n has exactly routes of ours to the pod CIDRs of
// the nodes in to.
func hasRoutes(t testing.TB, n *clusterNode, to ...*clusterNode) (bool, string) {
	got := map[string]string{}
	for k, v := range routeTable(t, n.h) {
		if strings.HasSuffix(v, " 81") {
			got[k] = v
		}
	}
	want := map[string]string{}
	for _, p := range to {
		want[p.cidr4] = p.ip4.String() + " 81"
		want[p.cidr6] = p.ip6.String() + " 81"
	}
	return showTable(got) == showTable(want), fmt.Sprintf("%s has %s, want %s", n.name, showTable(got), showTable(want))
}

func TestPodToPodAcrossNodesKernel(t *testing.T) {
	c := newCluster(t, 3)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	// A foreign route on node 1: an agent must never touch it.
	n1.Exec(t, "ip", "route", "add", "10.99.0.0/24", "via", "192.168.50.3", "proto", "static")

	// Without routes the pods cannot reach each other.
	if err := ping(n1.pod, n2.pod4); err == nil {
		t.Fatal("pods reach each other across nodes before any route exists: the test proves nothing")
	}
	for _, n := range c.nodes {
		c.start(t, n, 200*time.Millisecond)
	}
	eventually(t, 5*time.Second, "routes on node-1", func() (bool, string) { return hasRoutes(t, n1, n2, n3) })
	eventually(t, 5*time.Second, "routes on node-2", func() (bool, string) { return hasRoutes(t, n2, n1, n3) })
	eventually(t, 5*time.Second, "routes on node-3", func() (bool, string) { return hasRoutes(t, n3, n1, n2) })

	// Fresh links get their IPv6 link-local addresses only after DAD
	// (about a second): until then neighbour discovery on them stalls.
	// Nodes of a real cluster have long had theirs.
	for _, n := range c.nodes {
		for _, ns := range []*testnet.NS{n.NS, n.pod} {
			eventually(t, 5*time.Second, "IPv6 addresses settled in "+ns.Name, func() (bool, string) {
				out, err := ns.Try("ip", "-6", "addr", "show", "tentative")
				return err == nil && strings.TrimSpace(out) == "", out
			})
		}
	}
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

	// Source addresses: kept pod to pod, masqueraded towards a node (which
	// shows ipMasq is really on for these pods).
	const port = 7077
	for _, n := range c.nodes {
		echoServer(t, n.pod, port)
	}
	echoServer(t, n2.NS, port)
	for _, to := range []*clusterNode{n2, n3} {
		for _, pair := range [][2]net.IP{{to.pod4, n1.pod4}, {to.pod6, n1.pod6}} {
			eventually(t, 3*time.Second, "source kept towards "+pair[0].String(), func() (bool, string) {
				got, err := seenAs(t, n1.pod, pair[0], port)
				return err == nil && got == pair[1].String(), fmt.Sprintf("server saw %q (%v), want the pod's own %s", got, err, pair[1])
			})
		}
	}
	for _, pair := range [][2]net.IP{{n2.ip4, n1.ip4}, {n2.ip6, n1.ip6}} {
		if got, err := seenAs(t, n1.pod, pair[0], port); err != nil || got != pair[1].String() {
			t.Errorf("pod to node %s: server saw %q (%v), want the masqueraded %s", pair[0], got, err, pair[1])
		}
	}
	for _, n := range c.nodes {
		for _, cidr := range []string{n.cidr4, n.cidr6} {
			if !inClusterSet(n1, cidr) {
				t.Errorf("ipMasq cluster sets of node-1 lack %s", cidr)
			}
		}
	}

	// Drift: a route deleted or edited by hand is back within the resync.
	n1.Exec(t, "ip", "route", "del", n2.cidr4)
	n1.Exec(t, "ip", "-6", "route", "replace", n3.cidr6, "via", n2.ip6.String(), "proto", "81")
	start := time.Now()
	eventually(t, 3*time.Second, "drift repaired on node-1", func() (bool, string) { return hasRoutes(t, n1, n2, n3) })
	t.Logf("drift repaired in %v", time.Since(start).Round(time.Millisecond))
	if err := ping(n1.pod, n2.pod4); err != nil {
		t.Error(err)
	}
	if add, repl := metricOf(t, n1.reg, "qoscni_nodenet_route_changes_total", "add"),
		metricOf(t, n1.reg, "qoscni_nodenet_route_changes_total", "replace"); add < 5 || repl < 1 {
		t.Errorf("route changes on node-1: add %v, replace %v; want >= 5 (4 routes, 1 repair) and >= 1", add, repl)
	}

	// node-3 leaves: its routes go everywhere, and its CIDRs from ipMasq.
	if err := c.client.CoreV1().Nodes().Delete(context.Background(), n3.name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 3*time.Second, "node-3's routes removed on node-1", func() (bool, string) { return hasRoutes(t, n1, n2) })
	eventually(t, 3*time.Second, "node-3's routes removed on node-2", func() (bool, string) { return hasRoutes(t, n2, n1) })
	eventually(t, 3*time.Second, "node-3's CIDRs out of ipMasq on node-1", func() (bool, string) {
		return !inClusterSet(n1, n3.cidr4) && !inClusterSet(n1, n3.cidr6) && inClusterSet(n1, n2.cidr4) && inClusterSet(n1, n2.cidr6),
			n1.Exec(t, "nft", "list", "set", "inet", podnet.TableName, "masq-skip-cluster4")
	})
	if err := ping(n1.pod, n3.pod4); err == nil {
		t.Error("node-3's pods still reachable after its Node was deleted")
	}

	// The foreign route lived through every pass.
	time.Sleep(400 * time.Millisecond)
	if got := routeTable(t, n1.h)["10.99.0.0/24"]; got != "192.168.50.3 4" {
		t.Errorf("foreign route changed: %q", got)
	}
	if v := metricOf(t, n1.reg, "qoscni_nodenet_routes_installed", ""); v != 2 {
		t.Errorf("routes_installed = %v, want 2", v)
	}
	if v := metricOf(t, n1.reg, "qoscni_nodenet_reconcile_errors_total", "routes"); v != 0 {
		t.Errorf("reconcile errors = %v", v)
	}

	// Agents stop: the routes stay (pods keep talking through a restart).
	for _, n := range c.nodes {
		n.stop()
	}
	if ok, state := hasRoutes(t, n1, n2); !ok {
		t.Errorf("routes after the agent stopped: %s", state)
	}
}

// metricOf reads one series of reg (the first label's value = label).
func metricOf(t testing.TB, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label != "" && (len(m.GetLabel()) == 0 || m.GetLabel()[0].GetValue() != label) {
				continue
			}
			return m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s{%s} not found", name, label)
	return 0
}
