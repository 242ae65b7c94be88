package portmap

import (
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/net/bpf"

	"github.com/qoscni/qoscni/internal/testnet"
)

// frame is an Ethernet frame carrying an IPv4 header (and nothing more).
func frame(src, dst string) []byte {
	f := make([]byte, 14+20+8)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	f[14] = 0x45
	copy(f[26:30], net.ParseIP(src).To4())
	copy(f[30:34], net.ParseIP(dst).To4())
	return f
}

func TestGuardProgram(t *testing.T) {
	arp := frame("127.0.0.1", "127.0.0.1")
	binary.BigEndian.PutUint16(arp[12:], 0x0806)
	for _, c := range []struct {
		name string
		in   []byte
		mark uint32
		want int
	}{
		{"to 127.0.0.1", frame("10.0.0.2", "127.0.0.1"), 0, tcActShot},
		{"to 127.255.0.9, other mark bits", frame("10.0.0.2", "127.255.0.9"), ^uint32(localnetMark), tcActShot},
		{"to 127.0.0.1, marked reply", frame("10.0.0.2", "127.0.0.1"), localnetMark | 0x4000, tcActUnspec},
		{"from 127.0.0.5", frame("127.0.0.5", "10.0.0.1"), 0, tcActShot},
		{"from 127.0.0.5, marked", frame("127.0.0.5", "10.0.0.1"), localnetMark, tcActShot},
		{"pod to node", frame("10.0.0.2", "10.0.0.1"), 0, tcActUnspec},
		{"128/8 is not loopback", frame("128.0.0.1", "126.0.0.1"), 0, tcActUnspec},
		{"not IPv4", arp, 0, tcActUnspec},
		{"too short for an IPv4 header", frame("10.0.0.2", "127.0.0.1")[:33], 0, tcActUnspec},
	} {
		vm, err := bpf.NewVM(guardProgramWith(bpf.LoadConstant{Dst: bpf.RegA, Val: c.mark}))
		if err != nil {
			t.Fatal(err)
		}
		got, err := vm.Run(c.in)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got != c.want {
			t.Errorf("%s: verdict %d, want %d", c.name, got, c.want)
		}
	}
	if ops := guardOps(); !strings.HasPrefix(string(ops), string(guardMarker())) {
		t.Fatal("the program does not start with its ownership marker")
	}
}

func (w *world) bridgeMAC(t *testing.T) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	if err := testnet.InNS(w.node.Path, func() error {
		ifc, err := net.InterfaceByName(w.bridge)
		if err == nil {
			mac = ifc.HardwareAddr
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return mac
}

func (w *world) routeLocalnet(t *testing.T, iface string) string {
	t.Helper()
	return strings.TrimSpace(w.node.Exec(t, "sysctl", "-n", "net.ipv4.conf."+iface+".route_localnet"))
}

// probe sends n packets of each kind from the pod to the node's UDP
// port: to 127.0.0.1, from 127.0.0.5, and a control that must arrive. It
// returns how many of each arrived.
func probe(t *testing.T, w *world, p *pod, port uint16, n int) (to127, from127, control int) {
	t.Helper()
	sink := testnet.NewUDPSink(t, w.node.NS, int(port))
	sp := testnet.NewSpoofer(t, p.ns, "eth0", w.bridgeMAC(t))
	gw := net.ParseIP("10.99.0.1")
	for i := 0; i < n; i++ {
		for _, s := range []struct {
			src, dst net.IP
			tag      string
		}{{p.ip4, net.ParseIP("127.0.0.1"), "to127"}, {net.ParseIP("127.0.0.5"), gw, "from127"}, {p.ip4, gw, "control"}} {
			if err := sp.SendUDP(s.src, s.dst, 40000, port, []byte(s.tag)); err != nil {
				t.Fatal(err)
			}
		}
	}
	deadline := time.Now().Add(3 * time.Second)
	for sink.Count("control") < n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // stragglers of the other kinds
	return sink.Count("to127"), sink.Count("from127"), sink.Count("control")
}

// With the table gone (nft flush ruleset, uninstall of the table), the tc
// guard alone keeps a pod from the node's loopback; without either, the
// kernel delivers (the control half of the test).
func TestLocalnetGuardWithoutNftables(t *testing.T) {
	w := newWorld(t)
	p := w.addPod(t)
	maps := plan(t, p, tcp(8080, 80))
	w.add(t, p, maps)
	if got := w.routeLocalnet(t, w.bridge); got != "1" {
		t.Fatalf("route_localnet on %s = %s", w.bridge, got)
	}
	if err := w.m.CheckLocalnet(w.bridge); err != nil {
		t.Fatalf("CheckLocalnet after ADD: %v", err)
	}
	if err := Uninstall(w.nodeFd); err != nil {
		t.Fatal(err)
	}
	if to, from, ctl := probe(t, w, p, 9901, 20); to != 0 || from != 0 || ctl != 20 {
		t.Fatalf("no nftables, tc guard only: %d to 127.0.0.1 and %d from 127/8 arrived (want 0), %d of 20 controls", to, from, ctl)
	}

	// Control: no guard at all, and the same packets reach the node.
	w.node.Exec(t, "tc", "filter", "del", "dev", w.bridge, "ingress", "pref", "113")
	if err := w.m.CheckLocalnet(w.bridge); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("CheckLocalnet without the guard: %v", err)
	}
	if to, from, ctl := probe(t, w, p, 9902, 5); to == 0 || from == 0 || ctl != 5 {
		t.Fatalf("unguarded: %d to 127.0.0.1, %d from 127/8, %d controls arrived; the probes prove nothing", to, from, ctl)
	}
	// The next ADD puts both guards back.
	w.add(t, p, maps)
	if err := w.m.CheckLocalnet(w.bridge); err != nil {
		t.Fatalf("CheckLocalnet after the next ADD: %v", err)
	}
}

// A filter of someone else's at the guard's priority is never replaced:
// ADD fails naming it, and route_localnet stays off.
func TestLocalnetGuardForeignPriorityRefused(t *testing.T) {
	w := newWorld(t)
	p := w.addPod(t)
	w.node.Exec(t, "tc", "qdisc", "add", "dev", w.bridge, "clsact")
	w.node.Exec(t, "tc", "filter", "add", "dev", w.bridge, "ingress", "pref", "113", "protocol", "ip",
		"u32", "match", "ip", "dst", "192.0.2.1/32", "classid", "1:1")
	err := w.m.Add(p.owner, w.bridge, plan(t, p, tcp(8080, 80)))
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "u32") || !strings.Contains(e.Msg, w.bridge) {
		t.Fatalf("ADD beside a foreign filter at the guard's priority: %v", err)
	}
	if got := w.routeLocalnet(t, w.bridge); got != "0" {
		t.Fatalf("route_localnet on %s = %s without a guard", w.bridge, got)
	}
	if f := w.node.Exec(t, "tc", "filter", "show", "dev", w.bridge, "ingress"); !strings.Contains(f, "u32") || strings.Contains(f, "bpf") {
		t.Fatalf("ingress filters of %s: %s", w.bridge, f)
	}
}

func TestRouteLocalnetThroughNetlink(t *testing.T) {
	w := newWorld(t)
	h, err := linkHandle(w.nodeFd)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	idx, err := guardable(h, w.bridge)
	if err != nil {
		t.Fatal(err)
	}
	for _, on := range []bool{true, false} {
		if err := setRouteLocalnetNetlink(w.nodeFd, idx, on); err != nil {
			t.Fatal(err)
		}
		got, err := readRouteLocalnet(w.nodeFd, w.bridge)
		if err != nil || got != on {
			t.Fatalf("after setting %v through rtnetlink: %v, %v", on, got, err)
		}
	}
}
