package nodenet

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/qoscni/qoscni/internal/testnet"
)

// BenchEnv runs the measurements of test/bench/noderoutes.sh (they take a
// minute or more and need root, so plain go test skips them).
const BenchEnv = "QOSCNI_BENCH_NODEROUTES"

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func pct(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }

// TestBenchNodeRoutes: time from a Node created in the API (fake
// clientset) to its routes (IPv4 and IPv6) in the kernel, seen through a
// netlink route subscription, with NODES peers; then pod-to-pod
// throughput across two nodes over host-gw routes made by the agent
// against the same routes made by hand.
func TestBenchNodeRoutes(t *testing.T) {
	if os.Getenv(BenchEnv) == "" {
		t.Skipf("benchmark: run test/bench/noderoutes.sh (or set %s=1)", BenchEnv)
	}
	t.Run("latency", benchRouteLatency)
	t.Run("throughput", benchThroughput)
	t.Run("vxlan", benchVXLANThroughput)
}

func benchRouteLatency(t *testing.T) {
	nodes := envInt("NODES", 200)
	gap := time.Duration(envInt("GAP_MS", 150)) * time.Millisecond
	n := testnet.NewNode(t)
	n.Exec(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
	n.Exec(t, "ip", "link", "set", "eth0p", "up")
	n.Exec(t, "ip", "link", "set", "eth0", "up")
	n.Exec(t, "ip", "addr", "add", "172.20.255.254/16", "dev", "eth0")
	n.Exec(t, "ip", "addr", "add", "fd20::ffff/64", "dev", "eth0", "nodad")
	_, fd := handleIn(t, n.NS)

	peerNode := func(i int) *clusterNode {
		return &clusterNode{name: fmt.Sprintf("peer-%d", i),
			ip4: []byte{172, 20, byte(i >> 8), byte(i)}, ip6: ipOf(fmt.Sprintf("fd20::%x", i)),
			cidr4: fmt.Sprintf("10.%d.%d.0/24", 100+i>>8, i&255), cidr6: fmt.Sprintf("fd21:0:0:%x::/64", i)}
	}
	self := &clusterNode{name: "self", ip4: []byte{172, 20, 255, 254}, ip6: ipOf("fd20::ffff"), cidr4: "10.99.0.0/24", cidr6: "fd21:ffff::/64"}

	// Route appearances, by destination.
	updates := make(chan netlink.RouteUpdate, 8192)
	done := make(chan struct{})
	defer close(done)
	nsh := vnetns.NsHandle(fd)
	if err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{Namespace: &nsh, ReceiveBufferSize: 1 << 22}); err != nil {
		t.Fatal(err)
	}
	type seen struct {
		dst string
		at  time.Time
	}
	appeared := make(chan seen, 8192)
	go func() {
		for u := range updates {
			if u.Type == unix.RTM_NEWROUTE && u.Protocol == RouteProtocol && u.Dst != nil {
				appeared <- seen{u.Dst.String(), time.Now()}
			}
		}
	}()

	run := func(label string, burst bool) {
		client := fake.NewClientset(self.object())
		reg := prometheus.NewRegistry()
		ctx, cancel := context.WithCancel(context.Background())
		stop, err := StartAgent(ctx, AgentConfig{Mode: ModeHostGW, Client: client, NodeName: "self", NetnsFd: fd, Registerer: reg, Resync: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { cancel(); stop() }()
		time.Sleep(500 * time.Millisecond) // first list and pass
		created := make([]time.Time, nodes+1)
		create := func(i int) {
			created[i] = time.Now()
			if _, err := client.CoreV1().Nodes().Create(ctx, peerNode(i).object(), metav1.CreateOptions{}); err != nil {
				t.Error(err)
			}
		}
		want := map[string]int{}
		for i := 1; i <= nodes; i++ {
			want[peerNode(i).cidr4], want[peerNode(i).cidr6] = i, i
		}
		last := make([]time.Time, nodes+1) // the later of a node's two routes
		got := 0
		collect := func(until int, timeout time.Duration) {
			deadline := time.After(timeout)
			for got < until {
				select {
				case s := <-appeared:
					if i, ok := want[s.dst]; ok {
						delete(want, s.dst)
						if s.at.After(last[i]) {
							last[i] = s.at
						}
						got++
					}
				case <-deadline:
					t.Fatalf("%s: %d of %d routes after %v", label, got, until, timeout)
				}
			}
		}
		if burst {
			go func() {
				for i := 1; i <= nodes; i++ {
					create(i)
					// The fake clientset's watch panics when 100 events
					// are unread; let the informer catch up now and then.
					if i%50 == 0 {
						time.Sleep(5 * time.Millisecond)
					}
				}
			}()
			collect(2*nodes, 60*time.Second)
		} else {
			for i := 1; i <= nodes; i++ {
				create(i)
				collect(2*i, 10*time.Second)
				time.Sleep(gap)
			}
		}
		lat := make([]time.Duration, 0, nodes)
		for i := 1; i <= nodes; i++ {
			lat = append(lat, last[i].Sub(created[i]))
		}
		passes, mean := histo(t, reg, "qoscni_nodenet_reconcile_duration_seconds")
		fmt.Printf("| %s | %d | %s | %s | %s | %s | %d | %s |\n", label, nodes, ms(pct(lat, .5)), ms(pct(lat, .9)), ms(pct(lat, .99)), ms(pct(lat, 1)), passes, ms(mean))
		// Next run starts from no routes: remove the nodes and let it clean.
		for i := 1; i <= nodes; i++ {
			_ = client.CoreV1().Nodes().Delete(ctx, peerNode(i).name, metav1.DeleteOptions{})
			time.Sleep(time.Millisecond) // see the burst above
		}
		eventually(t, 30*time.Second, "routes removed", func() (bool, string) {
			out := n.Exec(t, "ip", "route", "show", "proto", "81")
			return strings.TrimSpace(out) == "", out
		})
	}
	fmt.Printf("\n## Node appears -> its routes (IPv4 + IPv6) in the kernel, ms (%d CPUs, kernel %s)\n\n", runtime.NumCPU(), kernelRelease())
	fmt.Println("| arrival | nodes | p50 | p90 | p99 | max | passes | mean pass |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|")
	run(fmt.Sprintf("one at a time, %v apart", gap), false)
	run("burst (all created back to back)", true)
}

func ipOf(s string) net.IP { return net.ParseIP(s) }

func histo(t *testing.T, reg *prometheus.Registry, name string) (uint64, time.Duration) {
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			h := mf.GetMetric()[0].GetHistogram()
			if h.GetSampleCount() == 0 {
				return 0, 0
			}
			return h.GetSampleCount(), time.Duration(h.GetSampleSum() / float64(h.GetSampleCount()) * float64(time.Second))
		}
	}
	return 0, 0
}

func benchThroughput(t *testing.T) {
	runs := envInt("RUNS", 3)
	secs := envInt("SECS", 5)
	c := newCluster(t, 2)
	n1, n2 := c.nodes[0], c.nodes[1]
	testnet.StartIperf3(t, n2.pod)
	for _, n := range c.nodes {
		for _, ns := range []*testnet.NS{n.NS, n.pod} {
			eventually(t, 5*time.Second, "IPv6 settled", func() (bool, string) {
				out, err := ns.Try("ip", "-6", "addr", "show", "tentative")
				return err == nil && strings.TrimSpace(out) == "", out
			})
		}
	}
	byHand := false
	agentRoutes := func() {
		for _, pair := range [][2]*clusterNode{{n1, n2}, {n2, n1}} {
			if byHand {
				pair[0].Exec(t, "ip", "route", "del", pair[1].cidr4, "via", pair[1].ip4.String())
			}
			c.start(t, pair[0], time.Hour)
		}
		eventually(t, 5*time.Second, "agent routes", func() (bool, string) {
			ok1, s1 := hasRoutes(t, n1, n2)
			ok2, s2 := hasRoutes(t, n2, n1)
			return ok1 && ok2, s1 + "; " + s2
		})
	}
	handRoutes := func() {
		for _, pair := range [][2]*clusterNode{{n1, n2}, {n2, n1}} {
			pair[0].stop()
			pair[0].Exec(t, "ip", "route", "flush", "proto", "81")
			pair[0].Exec(t, "ip", "route", "add", pair[1].cidr4, "via", pair[1].ip4.String())
		}
		byHand = true
	}
	agent, hand := alternate(runs, agentRoutes, handRoutes, func() float64 {
		return testnet.Iperf3Rate(t, n1.pod, n2.pod4.String(), secs, false)
	})
	printVersus(fmt.Sprintf("Pod to pod across nodes, iperf3 TCP %d s x %d runs (alternating), Gbit/s", secs, runs), "routes",
		"host-gw by the agent (proto 81)", "same routes by hand (ip route add)", "ratio agent/hand (medians)", agent, hand)
}

// alternate measures runs times with the agent's setup, then the
// hand-made one, in turn, so that both see the same machine.
func alternate(runs int, agent, hand func(), measure func() float64) (a, h []float64) {
	for r := 0; r < runs; r++ {
		agent()
		a = append(a, measure())
		hand()
		h = append(h, measure())
	}
	return a, h
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// printVersus prints the markdown table of two series in bit/s, as Gbit/s.
func printVersus(title, col, agentLabel, handLabel, ratioLabel string, a, h []float64) {
	gbit := func(v []float64) string {
		var p []string
		for _, x := range v {
			p = append(p, fmt.Sprintf("%.2f", x/1e9))
		}
		return strings.Join(p, ", ")
	}
	fmt.Printf("\n## %s\n\n", title)
	fmt.Printf("| %s | runs | median |\n", col)
	fmt.Println("|---|---|---:|")
	fmt.Printf("| %s | %s | %.2f |\n", agentLabel, gbit(a), median(a)/1e9)
	fmt.Printf("| %s | %s | %.2f |\n", handLabel, gbit(h), median(h)/1e9)
	fmt.Printf("\n%s: %.3f\n", ratioLabel, median(a)/median(h))
}

// benchVXLANThroughput: pod-to-pod iperf3 between node-1 and node-3 of the
// routed cluster (not on-link: VXLAN in mode auto) over the agent's
// device, routes, neighbour and FDB entries, against the same made by hand
// with ip/bridge, runs alternating.
func benchVXLANThroughput(t *testing.T) {
	runs := envInt("RUNS", 3)
	secs := envInt("SECS", 5)
	c := newRoutedCluster(t, ModeAuto)
	n1, n3 := c.nodes[0], c.nodes[2]
	pair := [][2]*clusterNode{{n1, n3}, {n3, n1}}
	testnet.StartIperf3(t, n3.pod)
	settleIPv6(t, c)
	byHand := false
	agent := func() {
		for _, p := range pair {
			if byHand {
				p[0].Exec(t, "ip", "link", "del", "vxh")
			}
			c.start(t, p[0], time.Hour)
		}
		for _, p := range pair {
			eventually(t, 5*time.Second, "agent VXLAN on "+p[0].name, func() (bool, string) {
				rt := routeTable(t, p[0].h)[p[1].cidr4]
				return rt == firstAddr(p[1].cidr4)+" 81", rt
			})
		}
	}
	hand := func() {
		for _, p := range pair {
			p[0].stop()
			p[0].Exec(t, "ip", "link", "del", VXLANDevice) // its routes go with it
			p[0].Exec(t, "ip", "link", "add", "vxh", "address", VTEPMAC(p[0].ip4).String(), "mtu", "1450", "type", "vxlan",
				"id", fmt.Sprint(VXLANVNI), "dstport", fmt.Sprint(VXLANPort), "local", p[0].ip4.String(), "dev", "eth0", "nolearning")
			p[0].Exec(t, "ip", "link", "set", "vxh", "up")
			gw, mac := firstAddr(p[1].cidr4), VTEPMAC(p[1].ip4).String()
			p[0].Exec(t, "ip", "route", "add", p[1].cidr4, "via", gw, "dev", "vxh", "onlink")
			p[0].Exec(t, "ip", "neigh", "add", gw, "lladdr", mac, "dev", "vxh", "nud", "permanent")
			p[0].Exec(t, "bridge", "fdb", "append", mac, "dev", "vxh", "dst", p[1].ip4.String(), "self", "permanent")
		}
		byHand = true
	}
	a, h := alternate(runs, agent, hand, func() float64 {
		return testnet.Iperf3Rate(t, n1.pod, n3.pod4.String(), secs, false)
	})
	printVersus(fmt.Sprintf("Pod to pod over VXLAN (nodes behind a router), iperf3 TCP %d s x %d runs (alternating), pod MTU 1450, Gbit/s", secs, runs), "VXLAN",
		VXLANDevice+" by the agent (route, neigh, fdb)", "same by hand (ip link/route/neigh, bridge fdb)", "ratio agent/hand VXLAN (medians)", a, h)
}

func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// BenchmarkReconcileSteady is one pass with nothing to change (the
// periodic drift check) at 1000 peers: what a large cluster costs per
// resync, per node.
func BenchmarkReconcileSteady(b *testing.B) {
	n := testnet.NewNode(b)
	n.Exec(b, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
	n.Exec(b, "ip", "link", "set", "eth0p", "up")
	n.Exec(b, "ip", "link", "set", "eth0", "up")
	n.Exec(b, "ip", "addr", "add", "172.20.255.254/16", "dev", "eth0")
	n.Exec(b, "ip", "addr", "add", "fd20::ffff/64", "dev", "eth0", "nodad")
	h, _ := handleIn(b, n.NS)
	var peers []Peer
	for i := 1; i <= 1000; i++ {
		peers = append(peers, Peer{Name: fmt.Sprintf("p%d", i),
			InternalIPs: []net.IP{{172, 20, byte(i >> 8), byte(i)}, net.ParseIP(fmt.Sprintf("fd20::%x", i))},
			PodCIDRs:    []*net.IPNet{mustCIDR(fmt.Sprintf("10.%d.%d.0/24", 100+i>>8, i&255)), mustCIDR(fmt.Sprintf("fd21:0:0:%x::/64", i))}})
	}
	r := NewRoutes(h, "self")
	if res, err := r.Reconcile(peers); err != nil || res.Installed != 2000 {
		b.Fatalf("%+v %v", res.Installed, err)
	}
	b.ResetTimer()
	for b.Loop() {
		if res, err := r.Reconcile(peers); err != nil || res.Added+res.Deleted+res.Replaced != 0 {
			b.Fatalf("%+v %v", res, err)
		}
	}
}

// BenchmarkDesired is the pure planning step at 5000 peers.
func BenchmarkDesired(b *testing.B) {
	var peers []Peer
	for i := 1; i <= 5000; i++ {
		peers = append(peers, Peer{Name: fmt.Sprintf("p%d", i),
			InternalIPs: []net.IP{{172, 20, byte(i >> 8), byte(i)}, net.ParseIP(fmt.Sprintf("fd20::%x", i))},
			PodCIDRs:    []*net.IPNet{mustCIDR(fmt.Sprintf("10.%d.%d.0/24", 100+i>>8, i&255)), mustCIDR(fmt.Sprintf("fd21:0:0:%x::/64", i))}})
	}
	on := func(net.IP) (bool, string, string) { return true, "", "" }
	for b.Loop() {
		Desired("self", peers, on)
	}
}
