package testnet

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// Routed is a node namespace routing between pods, each on a veth of its
// own: pod i has 10.81.i.2/24 and fd81:i::2/64, the node .1 and ::1 on
// its side. Every pod, and the node, serves TCP and UDP echo on
// RoutedPorts (both families).
type Routed struct {
	Node  *NS
	Pods  map[string]*NS
	index map[string]int
}

// RoutedPorts are the ports every pod and the node serve.
var RoutedPorts = []int{80, 81, 8050}

// NewRouted makes the node and the pods named.
func NewRouted(t *testing.T, pods ...string) *Routed {
	t.Helper()
	RequireRoot(t)
	w := &Routed{Node: NewNS(t, "qn"), Pods: map[string]*NS{}, index: map[string]int{}}
	n := w.Node.Name
	for _, s := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		w.Node.Exec(t, "sysctl", "-qw", s)
	}
	for i, p := range pods {
		ns := NewNS(t, "qp")
		w.Pods[p], w.index[p] = ns, i
		dev := fmt.Sprintf("to%d", i)
		Run(t, "ip", "-n", n, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns.Name)
		Run(t, "ip", "-n", n, "addr", "add", fmt.Sprintf("10.81.%d.1/24", i), "dev", dev)
		Run(t, "ip", "-n", n, "addr", "add", fmt.Sprintf("fd81:%x::1/64", i), "dev", dev, "nodad")
		Run(t, "ip", "-n", n, "link", "set", dev, "up")
		Run(t, "ip", "-n", ns.Name, "addr", "add", w.Addr(p, false).String()+"/24", "dev", "eth0")
		Run(t, "ip", "-n", ns.Name, "addr", "add", w.Addr(p, true).String()+"/64", "dev", "eth0", "nodad")
		Run(t, "ip", "-n", ns.Name, "link", "set", "eth0", "up")
		Run(t, "ip", "-n", ns.Name, "route", "add", "default", "via", fmt.Sprintf("10.81.%d.1", i))
		Run(t, "ip", "-n", ns.Name, "-6", "route", "add", "default", "via", fmt.Sprintf("fd81:%x::1", i))
		serve(t, ns)
	}
	serve(t, w.Node)
	// Neighbour discovery and router state first: the first packets
	// between the pods are lost until then.
	for _, p := range pods[1:] {
		for _, v6 := range []bool{false, true} {
			for i := 0; !w.TCP(pods[0], w.Addr(p, v6).String(), 80); i++ {
				if i == 10 {
					t.Fatalf("%s cannot reach %s", pods[0], w.Addr(p, v6))
				}
			}
		}
	}
	return w
}

// Addr is pod's address.
func (w *Routed) Addr(pod string, v6 bool) netip.Addr {
	i := w.index[pod]
	if v6 {
		return netip.MustParseAddr(fmt.Sprintf("fd81:%x::2", i))
	}
	return netip.MustParseAddr(fmt.Sprintf("10.81.%d.2", i))
}

// NodeAddr is the node's address on pod's veth.
func (w *Routed) NodeAddr(pod string, v6 bool) netip.Addr {
	i := w.index[pod]
	if v6 {
		return netip.MustParseAddr(fmt.Sprintf("fd81:%x::1", i))
	}
	return netip.MustParseAddr(fmt.Sprintf("10.81.%d.1", i))
}

// Target is where p goes: To's address, or for To "node" the node's on
// From's veth (the node's echo server answers an unconnected UDP
// datagram from the address its route to the sender picks).
func (w *Routed) Target(p Probe) netip.Addr {
	if p.To == "node" {
		return w.NodeAddr(p.From, p.V6)
	}
	return w.Addr(p.To, p.V6)
}

// serve answers TCP and UDP on RoutedPorts in ns, echoing.
func serve(t *testing.T, ns *NS) {
	t.Helper()
	for _, p := range RoutedPorts {
		EchoTCP(t, ns, fmt.Sprintf("[::]:%d", p))
		var pc net.PacketConn
		if err := InNS(ns.Path, func() (err error) {
			pc, err = net.ListenPacket("udp", fmt.Sprintf("[::]:%d", p))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 64)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
	}
}

// EchoTCP listens on hostport in ns (port 0: any) and echoes what each
// connection sends, until the test ends; it returns the port.
func EchoTCP(t testing.TB, ns *NS, hostport string) int {
	t.Helper()
	var l net.Listener
	if err := InNS(ns.Path, func() (err error) {
		l, err = net.Listen("tcp", hostport)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

// ProbeTimeout is how long a probe waits for a connection or an echo.
const ProbeTimeout = 400 * time.Millisecond

// Dial connects from a pod (or "node") to addr:port over network.
func (w *Routed) Dial(from, network, addr string, port int) (net.Conn, error) {
	ns := w.Node
	if from != "node" {
		ns = w.Pods[from]
	}
	var c net.Conn
	err := InNS(ns.Path, func() error {
		var err error
		c, err = net.DialTimeout(network, net.JoinHostPort(addr, fmt.Sprint(port)), ProbeTimeout)
		return err
	})
	return c, err
}

// Echo sends a byte on c and waits for it back.
func Echo(c net.Conn) bool {
	c.SetDeadline(time.Now().Add(ProbeTimeout))
	if _, err := c.Write([]byte("x")); err != nil {
		return false
	}
	buf := make([]byte, 1)
	n, err := c.Read(buf)
	return err == nil && n == 1
}

// TCP says whether a TCP connection from a pod (or "node") to addr:port
// carries an echo.
func (w *Routed) TCP(from, addr string, port int) bool {
	c, err := w.Dial(from, "tcp", addr, port)
	if err != nil {
		return false
	}
	defer c.Close()
	return Echo(c)
}

// UDP says whether a UDP datagram gets its echo (two tries).
func (w *Routed) UDP(from, addr string, port int) bool {
	c, err := w.Dial(from, "udp", addr, port)
	if err != nil {
		return false
	}
	defer c.Close()
	for range 2 {
		if Echo(c) {
			return true
		}
	}
	return false
}

// Probe is one connection attempt between pods (or "node").
type Probe struct {
	From, To string
	V6, UDP  bool
	Port     int
}

func (p Probe) String() string {
	proto, fam := "tcp", "v4"
	if p.UDP {
		proto = "udp"
	}
	if p.V6 {
		fam = "v6"
	}
	return fmt.Sprintf("%s -> %s %s %s/%d", p.From, p.To, fam, proto, p.Port)
}

// Run makes the probes, at most 8 at once, and says which got through.
func (w *Routed) Run(probes []Probe) []bool {
	out := make([]bool, len(probes))
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i, p := range probes {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			addr := w.Target(p).String()
			if p.UDP {
				out[i] = w.UDP(p.From, addr, p.Port)
			} else {
				out[i] = w.TCP(p.From, addr, p.Port)
			}
		})
	}
	wg.Wait()
	return out
}
