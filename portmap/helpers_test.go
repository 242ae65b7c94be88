package portmap

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/testnet"
)

// world is a node netns with a bridge for pods, a client netns standing for
// another machine (veth, own subnet) and a "far" netns behind the node
// standing for a third host the client reaches through the node.
//
//	client 10.98.0.2/fd98::2 --- node 10.98.0.1 (+.100), fd98::1 (+::100)
//	node br 10.99.0.1/fd99::1 --- pods 10.99.0.N/fd99::N
//	node 10.97.0.1 --- far 10.97.0.2
type world struct {
	node   *testnet.Node
	client *testnet.NS
	far    *testnet.NS
	bridge string
	nodeFd int
	m      *Manager
	pods   int
}

const (
	nodeAddr4   = "10.98.0.1"
	nodeAddr4b  = "10.98.0.100"
	nodeAddr6   = "fd98::1"
	nodeAddr6b  = "fd98::100"
	clientAddr4 = "10.98.0.2"
	farAddr4    = "10.97.0.2"
)

func newWorld(t *testing.T) *world {
	t.Helper()
	node := testnet.NewNode(t)
	w := &world{node: node, bridge: "br0"}
	w.client = testnet.NewNS(t, "qc")
	w.far = testnet.NewNS(t, "qf")
	ip := func(args ...string) { testnet.Run(t, "ip", args...) }
	n := node.Name
	for _, s := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		node.Exec(t, "sysctl", "-qw", s)
	}
	ip("-n", n, "link", "add", w.bridge, "type", "bridge")
	ip("-n", n, "addr", "add", "10.99.0.1/24", "dev", w.bridge)
	ip("-n", n, "addr", "add", "fd99::1/64", "dev", w.bridge, "nodad")
	ip("-n", n, "link", "set", w.bridge, "up")

	ip("-n", n, "link", "add", "toclient", "type", "veth", "peer", "name", "eth0", "netns", w.client.Name)
	ip("-n", n, "addr", "add", nodeAddr4+"/24", "dev", "toclient")
	ip("-n", n, "addr", "add", nodeAddr4b+"/24", "dev", "toclient")
	ip("-n", n, "addr", "add", nodeAddr6+"/64", "dev", "toclient", "nodad")
	ip("-n", n, "addr", "add", nodeAddr6b+"/64", "dev", "toclient", "nodad")
	ip("-n", n, "link", "set", "toclient", "up")
	c := w.client.Name
	ip("-n", c, "addr", "add", clientAddr4+"/24", "dev", "eth0")
	ip("-n", c, "addr", "add", "fd98::2/64", "dev", "eth0", "nodad")
	ip("-n", c, "link", "set", "eth0", "up")
	ip("-n", c, "route", "add", "default", "via", nodeAddr4)
	ip("-n", c, "-6", "route", "add", "default", "via", nodeAddr6)

	ip("-n", n, "link", "add", "tofar", "type", "veth", "peer", "name", "eth0", "netns", w.far.Name)
	ip("-n", n, "addr", "add", "10.97.0.1/24", "dev", "tofar")
	ip("-n", n, "link", "set", "tofar", "up")
	ip("-n", w.far.Name, "addr", "add", farAddr4+"/24", "dev", "eth0")
	ip("-n", w.far.Name, "link", "set", "eth0", "up")
	ip("-n", w.far.Name, "route", "add", "default", "via", "10.97.0.1")

	h, err := netns.GetFromPath(node.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	w.nodeFd = int(h)
	m, err := New(w.nodeFd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	w.m = m
	return w
}

type pod struct {
	ns       *testnet.NS
	ip4, ip6 net.IP
	owner    Owner
}

// addPod wires a pod netns to the bridge with the next addresses.
func (w *world) addPod(t *testing.T) *pod {
	t.Helper()
	w.pods++
	i := w.pods + 1
	p := &pod{ns: w.node.NewPod(t), ip4: net.ParseIP(fmt.Sprintf("10.99.0.%d", i)).To4(), ip6: net.ParseIP(fmt.Sprintf("fd99::%d", i))}
	p.owner = Owner{ContainerID: testnet.Unique("cid"), IfName: "eth0", PodNamespace: "test", PodName: fmt.Sprintf("pod-%d", i)}
	host := fmt.Sprintf("vp%d", i)
	ip := func(args ...string) { testnet.Run(t, "ip", args...) }
	ip("-n", w.node.Name, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", p.ns.Name)
	ip("-n", w.node.Name, "link", "set", host, "master", w.bridge, "up")
	// As the plugin's hairpinMode does: with br_netfilter, a pod's packet
	// DNATed back to itself is bridged out of the port it came in on.
	ip("-n", w.node.Name, "link", "set", host, "type", "bridge_slave", "hairpin", "on")
	ip("-n", p.ns.Name, "addr", "add", p.ip4.String()+"/24", "dev", "eth0")
	ip("-n", p.ns.Name, "addr", "add", p.ip6.String()+"/64", "dev", "eth0", "nodad")
	ip("-n", p.ns.Name, "link", "set", "eth0", "up")
	ip("-n", p.ns.Name, "route", "add", "default", "via", "10.99.0.1")
	ip("-n", p.ns.Name, "-6", "route", "add", "default", "via", "fd99::1")
	// IPv6 neighbours need the links settled; wait until both families answer.
	waitPing(t, w.client, p.ip4.String())
	waitPing(t, w.client, p.ip6.String())
	return p
}

func waitPing(t *testing.T, from *testnet.NS, addr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := from.Try("ping", "-c1", "-W1", addr)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ping %s from %s: %v\n%s", addr, from.Name, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (p *pod) ips() []net.IP { return []net.IP{p.ip4, p.ip6} }

// inNS runs fn on a thread switched into the namespace at path.
func inNS(t testing.TB, path string, fn func() error) error {
	t.Helper()
	return testnet.InNS(path, fn)
}

// serve starts TCP and UDP servers on port inside ns (all addresses) that
// answer with tag; TCP replies "tag" and closes, UDP echoes "tag:payload".
func serve(t *testing.T, ns *testnet.NS, port int, tag string) {
	t.Helper()
	var tl net.Listener
	var ul net.PacketConn
	err := inNS(t, ns.Path, func() error {
		var err error
		if tl, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", port)); err != nil {
			return err
		}
		ul, err = net.ListenPacket("udp", fmt.Sprintf("[::]:%d", port))
		return err
	})
	if err != nil {
		t.Fatalf("serve in %s: %v", ns.Name, err)
	}
	t.Cleanup(func() { tl.Close(); ul.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(tag))
			c.Close()
		}
	}()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, addr, err := ul.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = ul.WriteTo(append([]byte(tag+":"), buf[:n]...), addr)
		}
	}()
}

// tcpGet connects from ns to addr and returns what the server sent.
func tcpGet(t testing.TB, nsPath, addr string) (string, error) {
	t.Helper()
	var out string
	err := inNS(t, nsPath, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		b, err := io.ReadAll(c)
		out = string(b)
		return err
	})
	return out, err
}

// udpAsk sends one datagram from ns to addr and returns the answer.
func udpAsk(t testing.TB, nsPath, addr string) (string, error) {
	t.Helper()
	var out string
	err := inNS(t, nsPath, func() error {
		c, err := net.Dial("udp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 1500)
		for try := 0; try < 3; try++ {
			if _, err := c.Write([]byte("ping")); err != nil {
				continue
			}
			_ = c.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
			n, err := c.Read(buf)
			if err == nil {
				out = string(buf[:n])
				return nil
			}
		}
		return errors.New("no UDP answer")
	})
	return out, err
}

func mustTCP(t *testing.T, nsPath, addr, want string) {
	t.Helper()
	got, err := tcpGet(t, nsPath, addr)
	if err != nil || got != want {
		t.Fatalf("tcp %s from %s: got %q, err %v; want %q", addr, nsPath, got, err, want)
	}
}

func mustUDP(t *testing.T, nsPath, addr, want string) {
	t.Helper()
	got, err := udpAsk(t, nsPath, addr)
	if err != nil || !strings.HasPrefix(got, want+":") {
		t.Fatalf("udp %s from %s: got %q, err %v; want %q", addr, nsPath, got, err, want)
	}
}

func (w *world) nft(t *testing.T, args ...string) string {
	t.Helper()
	return w.node.Exec(t, "nft", args...)
}

func (w *world) count(t *testing.T) int {
	t.Helper()
	n, err := w.m.Count()
	if err != nil {
		t.Fatal(err)
	}
	return n
}
