package nodenet

import (
	"encoding/json"
	"fmt"
	"net"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/qoscni/qoscni/internal/testnet"
)

// TestCrossNodeShapingAndHostPort: shaping and hostPorts work unchanged
// for cross-node traffic. A pod on node-1 ADDed with an egress rate of
// 10 Mbit/s and a hostPort sends at that rate to pods on other nodes,
// whether the peer is reached over host-gw (node-2) or VXLAN (node-3);
// what it receives is not limited; and node-1's hostPort is reachable
// from pods on the other nodes.
func TestCrossNodeShapingAndHostPort(t *testing.T) {
	c := newRoutedCluster(t, ModeAuto)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]

	// The shaped pod on node-1, with a hostPort.
	const rate = 10_000_000
	const hostPort, containerPort = 30080, 8080
	shaped := n1.NewPod(t)
	conf := map[string]any{}
	if err := json.Unmarshal(conflist(n1), &conf); err != nil {
		t.Fatal(err)
	}
	conf["capabilities"] = map[string]any{"bandwidth": true, "portMappings": true}
	conf["runtimeConfig"] = map[string]any{
		"bandwidth":    map[string]any{"egressRate": rate, "egressBurst": 4294967295},
		"portMappings": []any{map[string]any{"hostPort": hostPort, "containerPort": containerPort, "protocol": "tcp"}},
	}
	b, _ := json.Marshal(conf)
	cid := testnet.Unique("c")
	r := n1.Invoke(t, testnet.Call{Command: "ADD", ContainerID: cid, Netns: shaped.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=shaped;K8S_POD_UID=uid-" + cid, Config: b}).MustSucceed(t, "ADD shaped pod")
	t.Cleanup(func() {
		n1.Invoke(t, testnet.Call{Command: "DEL", ContainerID: cid, Netns: shaped.Path, IfName: "eth0",
			Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=shaped;K8S_POD_UID=uid-" + cid, Config: b})
	})
	res := &current.Result{}
	if err := json.Unmarshal(r.Stdout, res); err != nil {
		t.Fatalf("decode ADD result: %v\n%s", err, r.Stdout)
	}
	var shaped4 net.IP
	for _, ip := range res.IPs {
		if ip.Address.IP.To4() != nil {
			shaped4 = ip.Address.IP.To4()
		}
	}
	if shaped4 == nil {
		t.Fatalf("shaped pod: no IPv4 address in %s", r.Stdout)
	}

	for _, n := range c.nodes {
		c.start(t, n, 200*time.Millisecond)
	}
	want := func(n *clusterNode, hostgw, vx []*clusterNode) {
		t.Helper()
		eventually(t, 5*time.Second, "state of "+n.name, func() (bool, string) { return hasVXLAN(t, n, hostgw, vx) })
	}
	want(n1, []*clusterNode{n2}, []*clusterNode{n3})
	want(n2, []*clusterNode{n1}, []*clusterNode{n3})
	want(n3, nil, []*clusterNode{n1, n2})
	for _, to := range []*clusterNode{n2, n3} {
		eventually(t, 5*time.Second, "shaped pod reaches "+to.name, func() (bool, string) {
			err := ping(shaped, to.pod4)
			return err == nil, fmt.Sprint(err)
		})
	}

	// (1) and (2): egress shaped whatever the destination; ingress not.
	for _, to := range []*clusterNode{n2, n3} {
		via := "host-gw"
		if to == n3 {
			via = "VXLAN"
		}
		testnet.StartIperf3(t, to.pod)
		start := time.Now()
		up := testnet.Iperf3Rate(t, shaped, to.pod4.String(), 4, false)
		down := testnet.Iperf3Rate(t, shaped, to.pod4.String(), 4, true)
		t.Logf("shaped pod -> %s pod (%s): %.2f Mbit/s; %s pod -> shaped pod: %.2f Mbit/s (%v)",
			to.name, via, up/1e6, to.name, down/1e6, time.Since(start).Round(time.Millisecond))
		if up < 0.85*rate || up > 1.05*rate {
			t.Errorf("egress to %s (%s): %.2f Mbit/s, want 8.5-10.5", to.name, via, up/1e6)
		}
		if down < 50e6 {
			t.Errorf("ingress from %s (%s): %.2f Mbit/s, want > 50 (ingress is not shaped)", to.name, via, down/1e6)
		}
	}

	// (3) node-1's hostPort from pods on the other nodes.
	echoServer(t, shaped, containerPort)
	for _, from := range []*clusterNode{n2, n3} {
		var seen string
		eventually(t, 3*time.Second, "hostPort of node-1 from "+from.name+"'s pod", func() (bool, string) {
			got, err := seenAs(t, from.pod, n1.ip4, hostPort)
			seen = got
			return err == nil && got != "", fmt.Sprintf("saw %q (%v)", got, err)
		})
		kind := "other"
		switch seen {
		case from.pod4.String():
			kind = "the client pod's own address (not SNATed)"
		case from.ip4.String():
			kind = "the client's node address"
		case n1.ip4.String():
			kind = "node-1's address (masqueraded)"
		}
		t.Logf("hostPort %s:%d from %s pod %s: workload saw %s = %s", n1.ip4, hostPort, from.name, from.pod4, seen, kind)
	}
}
