package agent

import (
	"errors"
	"net"
	"syscall"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// TestAgentKernelControlMetrics: a pod's controls are exported with what
// nftables counted for them, a missing element reads up 0, and a counter
// does not go backwards when the element is set anew.
func TestAgentKernelControlMetrics(t *testing.T) {
	node := testnet.NewNode(t)
	pod := newShapedPod(t, node, 3, 100_000_000, 100_000_000)
	dscp := uint8(46)
	pod.rec.Controls = &state.Controls{Ingress: &state.ControlDirection{PacketRate: 100, PacketBurst: 5},
		Egress: &state.ControlDirection{MaxConnections: 4}, DSCP: &dscp}
	if err := state.New(node.StateDir).Save(pod.rec); err != nil {
		t.Fatal(err)
	}
	h, err := netns.GetFromPath(node.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	m, err := controls.New(int(h))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ips := []net.IP{net.ParseIP(pod.podIP)}
	set := func() {
		if err := m.Set(controls.OwnerOf(pod.rec), ips, pod.rec.Controls); err != nil {
			t.Fatal(err)
		}
	}
	set()
	srv := startAgent(t, node, writeConflist(t, node.Dir, node.IPAMDir))
	// 500 datagrams from the node into the pod, at once: far over 100/s.
	// It returns how many left the socket: those written and those the
	// output hook dropped (EPERM). A datagram that passed makes the pod
	// answer port unreachable, which fails the socket's next write.
	flood := func() (sent int) {
		t.Helper()
		if err := inNetns(node.Path, func() error {
			c, err := net.Dial("udp", net.JoinHostPort(pod.podIP, "9"))
			if err != nil {
				return err
			}
			defer c.Close()
			for range 500 {
				if _, err := c.Write([]byte("x")); err == nil || errors.Is(err, syscall.EPERM) {
					sent++
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return sent
	}
	sent := flood()
	in := map[string]string{"namespace": "team-a", "pod": pod.rec.Pod.Name, "interface": "eth0", "direction": "ingress"}
	out := map[string]string{"namespace": "team-a", "pod": pod.rec.Pod.Name, "interface": "eth0", "direction": "egress"}
	with := func(l map[string]string, k, v string) map[string]string {
		c := map[string]string{k: v}
		for a, b := range l {
			c[a] = b
		}
		return c
	}
	s := scrapeAgent(t, srv.Addr())
	dropped := s.must(t, "qoscni_control_dropped_packets_total", in)
	if dropped < 300 {
		t.Errorf("dropped over 100 packets/s: %v of 500 sent at once, want most", dropped)
	}
	// The rate met every datagram sent (and maybe a neighbour probe):
	// the dropped ones, and the bucket's 5 and at most 100/s more passed.
	if offered := s.must(t, "qoscni_control_offered_packets_total", in); offered < float64(sent) || offered > float64(sent)+5 || offered-dropped > 50 {
		t.Errorf("offered %v with %v dropped, want the %d sent (a few passed)", offered, dropped, sent)
	}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"qoscni_control_packet_rate_limit_packets_per_second", in, 100},
		{"qoscni_control_packet_burst_packets", in, 5},
		{"qoscni_control_max_connections", out, 4},
		{"qoscni_control_refused_connections_total", out, 0},
		{"qoscni_control_up", with(in, "control", "packet-rate"), 1},
		{"qoscni_control_up", with(out, "control", "connections"), 1},
		{"qoscni_control_up", with(out, "control", "dscp"), 1},
		{"qoscni_control_dscp", map[string]string{"pod": pod.rec.Pod.Name, "interface": "eth0"}, 46},
		{"qoscni_control_bypassing_flowtables", map[string]string{}, 0},
	} {
		if v := s.must(t, c.name, c.labels); v != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, v, c.want)
		}
	}
	for _, name := range []string{"qoscni_control_dropped_packets_total", "qoscni_control_offered_packets_total"} {
		if _, ok := s.value(name, out); ok {
			t.Errorf("a packet-rate series %s for egress, which has none", name)
		}
	}
	node.Exec(t, "nft", "delete", "element", "inet", "qoscni", "pkt-drop-ingress4", "{", pod.podIP, "}")
	node.Exec(t, "nft", "delete", "element", "inet", "qoscni", "dscp4", "{", pod.podIP, "}")
	s = scrapeAgent(t, srv.Addr())
	if v := s.must(t, "qoscni_control_up", with(in, "control", "packet-rate")); v != 0 {
		t.Errorf("up after the drop counter's element went = %v, want 0", v)
	}
	if v := s.must(t, "qoscni_control_up", with(out, "control", "dscp")); v != 0 {
		t.Errorf("DSCP up after its element went = %v, want 0", v)
	}
	set()
	flood()
	if v := scrapeAgent(t, srv.Addr()).must(t, "qoscni_control_dropped_packets_total", in); v < dropped+300 {
		t.Errorf("dropped after the element was set anew = %v, want >= %v + 300", v, dropped)
	}
}
