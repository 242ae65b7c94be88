package main

import (
	"net/netip"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/cni/netpolnft"
	"github.com/qoscni/qoscni/internal/testnet"
)

// TestPolicyPendingUntilAgent: with "policy": {"type": "k8s"} a new pod
// is closed both ways (to the other pod, to the node) from the moment it
// has its addresses, while the node still reaches it (kubelet probes);
// once the agent's state names it ready (netpolnft.Apply, as the agent
// does) it talks; a pod of a network without the key is never pending;
// DEL leaves nothing.
func TestPolicyPendingUntilAgent(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	conf := netConf(n, "1.1.0", func(c map[string]any) { c["policy"] = map[string]any{"type": "k8s"} })
	p1, p2 := n.NewPod(t), n.NewPod(t)
	r1 := add(t, n, conf, "np1", p1)
	r2 := add(t, n, conf, "np2", p2)
	a1, a2 := r1.IPs[0].Address.IP.String(), r2.IPs[0].Address.IP.String()
	for _, c := range []struct {
		from *testnet.NS
		to   string
	}{{p1, a2}, {p2, a1}, {p1, "10.77.0.1"}, {p1, r2.IPs[1].Address.IP.String()}} {
		if _, err := c.from.Try("ping", "-c1", "-W1", c.to); err == nil {
			t.Errorf("a pending pod reached %s", c.to)
		}
	}
	n.Exec(t, "ping", "-c1", "-W2", a1)

	// The agent's turn: both pods ready, no policy selects them.
	h, err := netns.GetFromPath(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	m, err := netpolnft.New(int(h))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ready := map[netip.Addr]netpolnft.Owner{}
	for cid, r := range map[string][]string{"np1": {a1, r1.IPs[1].Address.IP.String()}, "np2": {a2, r2.IPs[1].Address.IP.String()}} {
		for _, a := range r {
			ready[netip.MustParseAddr(a)] = netpolnft.Owner{ContainerID: cid, IfName: "eth0"}
		}
	}
	if _, err := m.Apply(&netpolnft.State{Ready: ready}); err != nil {
		t.Fatal(err)
	}
	p1.Exec(t, "ping", "-c1", "-W2", a2)
	p2.Exec(t, "ping", "-6", "-c1", "-W2", r1.IPs[1].Address.IP.String())

	// Without the key, never pending.
	plain := netConf(n, "1.1.0", nil)
	p3 := n.NewPod(t)
	add(t, n, plain, "np3", p3)
	p3.Exec(t, "ping", "-c1", "-W2", a1)
	for _, c := range []struct {
		cid string
		pod *testnet.NS
		cf  []byte
	}{{"np1", p1, conf}, {"np2", p2, conf}, {"np3", p3, plain}} {
		del(t, n, c.cf, c.cid, c.pod.Path)
	}
	assertClean(t, n)
}
