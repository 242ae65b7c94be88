package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/grant"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
)

// guaranteeConf is a standalone config with a node capacity, for a pod
// with these annotations.
func guaranteeConf(n *testnet.Node, annotations map[string]string) []byte {
	return netConf(n, "1.1.0", func(c map[string]any) {
		c["capabilities"] = map[string]any{"io.kubernetes.cri.pod-annotations": true}
		c["nodeCapacity"] = map[string]any{"ingress": "100M", "egress": "100M"}
		if annotations != nil {
			c["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": annotations}
		}
	})
}

func requestOf(bits string, prio string) map[string]string {
	m := map[string]string{shaping.AnnotationIngressRequest: bits, shaping.AnnotationEgressRequest: bits}
	if prio != "" {
		m[shaping.AnnotationPriority] = prio
	}
	return m
}

// With a node capacity every pod joins the node hierarchy: a request is
// admitted while it fits and refused with code 101 and nothing changed
// when it does not; best-effort pods join without one; DEL gives the
// request back; the pods reach each other through it.
func TestGuaranteedBandwidthThroughPlugin(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	a, b, c := n.NewPod(t), n.NewPod(t), n.NewPod(t)
	ra := add(t, n, guaranteeConf(n, requestOf("60M", "high")), "ga", a)
	add(t, n, guaranteeConf(n, requestOf("30M", "")), "gb", b)

	recA := readRecord(t, n, "ga")
	if recA.Shaping == nil || recA.Shaping.Guarantee == nil || recA.Shaping.Ingress != nil || recA.Shaping.Egress != nil {
		t.Fatalf("record of a: %+v", recA.Shaping)
	}
	g := recA.Shaping.Guarantee
	if g.Minor < shaping.MinMinor || g.Ingress == nil || g.Ingress.RequestBits != 60_000_000 || g.Ingress.CeilBits != 100_000_000 || g.Ingress.Priority != "high" {
		t.Errorf("guarantee of a: %+v %+v", g, g.Ingress)
	}
	classes := n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB)
	if !strings.Contains(classes, "rate 60Mbit ceil 100Mbit") || !strings.Contains(classes, "rate 30Mbit ceil 100Mbit") ||
		!strings.Contains(classes, "class htb 1:2 parent 1:1 rate 10001Kbit") {
		t.Errorf("classes into pods:\n%s", classes)
	}
	if strings.Contains(string(n.Exec(t, "ip", "-o", "link")), " qi") {
		t.Errorf("a pod in the hierarchy got an IFB of its own:\n%s", n.Exec(t, "ip", "-o", "link"))
	}

	// CHECK compares the pod's classes, entries and redirects with its
	// record, and names the drift.
	chk := withPrev(t, guaranteeConf(n, requestOf("60M", "high")), mustJSON(t, ra))
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "ga", Netns: a.Path, IfName: "eth0", Config: chk}).MustSucceed(t, "CHECK")
	n.Exec(t, "tc", "class", "change", "dev", shaping.HierarchyEgressIFB, "parent", "1:1", "classid", fmt.Sprintf("1:%x", g.Minor),
		"htb", "rate", "1mbit", "ceil", "100mbit")
	bad := n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "ga", Netns: a.Path, IfName: "eth0", Config: chk})
	if !bad.Failed || !strings.Contains(bad.Err.Msg, shaping.HierarchyEgressIFB) || !strings.Contains(bad.Err.Msg, fmt.Sprintf("class 1:%x", g.Minor)) {
		t.Errorf("CHECK after a class drifted: %+v", bad.Err)
	}
	n.Exec(t, "tc", "class", "change", "dev", shaping.HierarchyEgressIFB, "parent", "1:1", "classid", fmt.Sprintf("1:%x", g.Minor),
		"htb", "rate", "60mbit", "ceil", "100mbit", "prio", "0")

	// 20M more does not fit in 100M with 90M reserved: refused, and the
	// node is as it was.
	before := n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyEgressIFB) + n.Exec(t, "ip", "-br", "link")
	refused := guaranteeConf(n, requestOf("20M", ""))
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "gc", Netns: c.Path, IfName: "eth0", Config: refused})
	if !r.Failed || r.Err.Code != shaping.ErrBandwidthUnavailable {
		t.Fatalf("ADD over the capacity: %+v", r.Err)
	}
	for _, want := range []string{"node capacity 100Mbit/s", "90Mbit/s already reserved", "requests 20Mbit/s", shaping.AnnotationIngressRequest} {
		if !strings.Contains(r.Err.Msg, want) {
			t.Errorf("refusal %q does not say %q", r.Err.Msg, want)
		}
	}
	if after := n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyEgressIFB) + n.Exec(t, "ip", "-br", "link"); after != before {
		t.Errorf("the refused ADD changed the node:\n%s\n---\n%s", before, after)
	}
	// The runtime DELs what ADD refused.
	del(t, n, refused, "gc", c.Path)
	rc := add(t, n, guaranteeConf(n, nil), "gc", c)

	// Pod to pod through both IFBs, over the classes of the two pods.
	a.Exec(t, "ping", "-c", "2", "-i", "0.2", "-w", "10", rc.IPs[0].Address.IP.String())
	c.Exec(t, "ping", "-c", "2", "-i", "0.2", "-w", "10", ra.IPs[0].Address.IP.String())

	del(t, n, guaranteeConf(n, nil), "ga", a.Path)
	classes = n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB)
	if strings.Contains(classes, "rate 60Mbit") || !strings.Contains(classes, "class htb 1:2 parent 1:1 rate 70001Kbit") {
		t.Errorf("after DEL of a:\n%s", classes)
	}
	// Now the 20M fit.
	del(t, n, guaranteeConf(n, nil), "gc", c.Path)
	add(t, n, guaranteeConf(n, requestOf("20M", "low")), "gc", c)
	for _, cid := range []string{"gb", "gc"} {
		del(t, n, guaranteeConf(n, nil), cid, "")
		del(t, n, guaranteeConf(n, nil), cid, "")
	}
	for _, dev := range []string{shaping.HierarchyIngressIFB, shaping.HierarchyEgressIFB} {
		out := n.Exec(t, "tc", "class", "show", "dev", dev) + n.Exec(t, "tc", "filter", "show", "dev", dev)
		if strings.Contains(out, "flowid 1:1") && strings.Contains(out, "*flowid") {
			t.Errorf("%s keeps pod entries:\n%s", dev, out)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "class htb 1:") && !strings.HasPrefix(l, "class htb 1:1 ") && !strings.HasPrefix(l, "class htb 1:2 ") && !strings.HasPrefix(l, "class htb 1:3 ") {
				t.Errorf("%s keeps a pod class: %s", dev, l)
			}
		}
	}
	assertClean(t, n)
}

// Chained after the reference bridge: the main plugin's veths join the
// node hierarchy; a refused request leaves the main plugin's veth as it
// was; DEL takes only qoscni's classes, entries and redirects away.
func TestGuaranteedBandwidthChained(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	ref := requireRefPlugins(t, "bridge")
	mainConf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "qtest", "type": "bridge", "bridge": "refbr1", "isGateway": true,
		"ipam": map[string]any{"type": "host-local", "ranges": []any{[]any{map[string]any{"subnet": "10.82.0.0/24"}}}, "dataDir": filepath.Join(n.Dir, "hl")},
	})
	chained := func(prev []byte, annotations map[string]string) []byte {
		c, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "qtest", "type": "qoscni", "stateDir": n.StateDir,
			"capabilities":  map[string]any{"io.kubernetes.cri.pod-annotations": true},
			"nodeCapacity":  map[string]any{"ingress": "100M", "egress": "100M"},
			"runtimeConfig": map[string]any{"io.kubernetes.cri.pod-annotations": annotations}})
		return withPrev(t, c, prev)
	}
	type pod struct {
		ns   *testnet.NS
		env  []string
		prev []byte
		conf []byte
	}
	var pods []*pod
	for i, req := range []string{"70M", "40M"} {
		p := &pod{ns: n.NewPod(t)}
		cid := fmt.Sprintf("gch%d", i)
		p.env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=" + cid, "CNI_NETNS=" + p.ns.Path, "CNI_IFNAME=eth0", "CNI_PATH=" + ref}
		p.prev = runRefPlugin(t, n, "bridge", p.env, mainConf)
		p.conf = chained(p.prev, requestOf(req, ""))
		pods = append(pods, p)
	}
	n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "gch0", Netns: pods[0].ns.Path, IfName: "eth0", Config: pods[0].conf}).MustSucceed(t, "chained ADD")
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "gch0", Netns: pods[0].ns.Path, IfName: "eth0", Config: pods[0].conf}).MustSucceed(t, "chained CHECK")
	if c := n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB); !strings.Contains(c, "rate 70Mbit ceil 100Mbit") {
		t.Errorf("classes:\n%s", c)
	}
	veth1 := readRecord(t, n, "gch0").HostVeth
	// 40M next to 70M does not fit: refused, the main plugin's veth as it was.
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "gch1", Netns: pods[1].ns.Path, IfName: "eth0", Config: pods[1].conf})
	if !r.Failed || r.Err.Code != shaping.ErrBandwidthUnavailable {
		t.Fatalf("chained ADD over the capacity: %+v", r.Err)
	}
	for _, l := range strings.Split(n.Exec(t, "ip", "-o", "link", "show", "master", "refbr1"), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		dev := strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0]
		if dev == veth1 {
			continue
		}
		if q := n.Exec(t, "tc", "qdisc", "show", "dev", dev); strings.Contains(q, "clsact") {
			t.Errorf("the refused ADD left a clsact on the main plugin's veth %s: %s", dev, q)
		}
	}
	n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "gch1", Netns: pods[1].ns.Path, IfName: "eth0", Config: pods[1].conf}).MustSucceed(t, "DEL of the refused")
	// Pod to pod over the bridge, through the hierarchy.
	pods[0].ns.Exec(t, "ping", "-c", "2", "-i", "0.2", "-w", "10", "10.82.0.1")
	n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "gch0", Netns: pods[0].ns.Path, IfName: "eth0", Config: pods[0].conf}).MustSucceed(t, "chained DEL")
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", veth1); strings.Contains(q, "clsact") {
		t.Errorf("DEL left qoscni's redirects on %s: %s", veth1, q)
	}
	if c := n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB); strings.Contains(c, "rate 70Mbit") {
		t.Errorf("DEL left the class:\n%s", c)
	}
	if _, err := n.Try("ip", "link", "show", veth1); err != nil {
		t.Errorf("chained DEL removed the main plugin's veth %s", veth1)
	}
	for _, p := range pods {
		p.env[0] = "CNI_COMMAND=DEL"
		runRefPlugin(t, n, "bridge", p.env, mainConf)
	}
}

// A pod whose DRA claim the kubelet prepared (its grant beside the
// registry, found by the pod UID in CNI_ARGS) gets the claim as its
// request in that direction, whatever its request annotation says; the
// other direction keeps the annotation's. A grant over what is left of
// the capacity is refused as an annotation's would be.
func TestGuaranteeFromDRAGrant(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	a, b := n.NewPod(t), n.NewPod(t)
	grants := paths.GrantDirOf(n.Registry)
	if err := grant.Write(grants, "uid-dra1", "claim-1", grant.Grant{Claim: "default/dra1-bw", EgressBits: 40_000_000}); err != nil {
		t.Fatal(err)
	}
	add(t, n, guaranteeConf(n, requestOf("10M", "")), "dra1", a)
	rec := readRecord(t, n, "dra1")
	g := rec.Shaping.Guarantee
	if g == nil || g.Egress == nil || g.Egress.RequestBits != 40_000_000 || g.Ingress == nil || g.Ingress.RequestBits != 10_000_000 {
		t.Fatalf("guarantee %+v", g)
	}
	if out := n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyEgressIFB); !strings.Contains(out, fmt.Sprintf("class htb 1:%x parent 1:1 ", g.Minor)) ||
		!strings.Contains(out, "rate 40Mbit ceil 100Mbit") {
		t.Errorf("egress class of the claimed pod:\n%s", out)
	}
	if out := n.Exec(t, "tc", "class", "show", "dev", shaping.HierarchyIngressIFB); !strings.Contains(out, "rate 10Mbit ceil 100Mbit") {
		t.Errorf("ingress class (the annotation's request):\n%s", out)
	}
	// 70M granted on top of 40M does not fit in 100M.
	if err := grant.Write(grants, "uid-dra2", "claim-2", grant.Grant{Claim: "default/dra2-bw", EgressBits: 70_000_000}); err != nil {
		t.Fatal(err)
	}
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "dra2", Netns: b.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=dra2;K8S_POD_UID=uid-dra2", Config: guaranteeConf(n, nil)})
	if !r.Failed || r.Err.Code != shaping.ErrBandwidthUnavailable || !strings.Contains(r.Err.Msg, "requests 70Mbit/s (its DRA claims)") {
		t.Fatalf("ADD of a grant over the capacity: %+v", r.Err)
	}
	del(t, n, guaranteeConf(n, nil), "dra2", b.Path)
	del(t, n, guaranteeConf(n, nil), "dra1", a.Path)
}
