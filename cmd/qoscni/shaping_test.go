package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// shapedConf is a standalone config with the bandwidth capabilities and
// runtimeConfig as containerd sends it for an annotated pod.
func shapedConf(n *testnet.Node, annotations map[string]string, bw map[string]any) []byte {
	return netConf(n, "1.1.0", func(c map[string]any) {
		c["capabilities"] = map[string]any{"bandwidth": true, "io.kubernetes.cri.pod-annotations": true}
		rc := map[string]any{}
		if annotations != nil {
			rc["io.kubernetes.cri.pod-annotations"] = annotations
		}
		if bw != nil {
			rc["bandwidth"] = bw
		}
		c["runtimeConfig"] = rc
	})
}

func readRecord(t *testing.T, n *testnet.Node, cid string) *state.Record {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.StateDir, "qtest", cid+"_eth0.json"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := state.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestShapingFromAnnotations(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	// What containerd sends: the annotation, and the same rates with its
	// 4294967295-bit burst in runtimeConfig.bandwidth (Go field names).
	conf := shapedConf(n,
		map[string]string{"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "20M"},
		map[string]any{"IngressRate": 10_000_000, "IngressBurst": 4294967295, "EgressRate": 20_000_000, "EgressBurst": 4294967295})
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "sh1", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "ADD")
	rec := readRecord(t, n, "sh1")
	if rec.Shaping == nil || rec.Shaping.Ingress == nil || rec.Shaping.Egress == nil {
		t.Fatalf("record shaping: %+v", rec.Shaping)
	}
	in, eg := rec.Shaping.Ingress, rec.Shaping.Egress
	if in.RateBits != 10_000_000 || in.Source != "annotation" || in.Device != rec.HostVeth {
		t.Errorf("ingress: %+v", in)
	}
	// The runtime's burst is above the cap: derived from the 10 ms budget.
	if in.BurstBits > 10_000_000/4 || in.LimitBytes != 12_500 || in.MaxQueueDelayNs != 10_000_000 {
		t.Errorf("ingress burst/limit: %+v", in)
	}
	if eg.RateBits != 20_000_000 || eg.Device != rec.Shaping.IFB {
		t.Errorf("egress: %+v", eg)
	}
	if !strings.Contains(string(r.Stdout), rec.Shaping.IFB) {
		t.Errorf("result lacks the IFB: %s", r.Stdout)
	}
	q := n.Exec(t, "tc", "-s", "qdisc", "show", "dev", rec.HostVeth)
	if !strings.Contains(q, "tbf 1: root") || !strings.Contains(q, "rate 10Mbit") || !strings.Contains(q, "burst 62500b") || !strings.Contains(q, "peakrate 100Mbit") {
		t.Errorf("veth qdisc: %s", q)
	}
	q = n.Exec(t, "tc", "-s", "qdisc", "show", "dev", rec.Shaping.IFB)
	if !strings.Contains(q, "tbf 1: root") || !strings.Contains(q, "rate 20Mbit") {
		t.Errorf("ifb qdisc: %s", q)
	}
	if l := n.Exec(t, "ip", "-o", "link", "show", rec.Shaping.IFB); !strings.Contains(l, "mtu 1500") {
		t.Errorf("ifb MTU: %s", l)
	}
	chk := withPrev(t, conf, r.Stdout)
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "sh1", Netns: pod.Path, IfName: "eth0", Config: chk}).MustSucceed(t, "CHECK")
	// Drift: the egress shaper is deleted by hand; CHECK names it.
	n.Exec(t, "tc", "qdisc", "del", "dev", rec.Shaping.IFB, "root")
	bad := n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "sh1", Netns: pod.Path, IfName: "eth0", Config: chk})
	if !bad.Failed || !strings.Contains(bad.Err.Msg, rec.Shaping.IFB) {
		t.Fatalf("CHECK after drift: %+v", bad.Err)
	}
	// DEL without runtimeConfig removes the IFB (the record knows it).
	plain := netConf(n, "1.1.0", nil)
	del(t, n, plain, "sh1", pod.Path)
	if _, err := n.Try("ip", "link", "show", rec.Shaping.IFB); err == nil {
		t.Error("IFB survived DEL")
	}
	del(t, n, plain, "sh1", "")
	assertClean(t, n)
}

// Not parallel: a throughput check wants the CPU to itself.
func TestShapingThroughput(t *testing.T) {
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	conf := shapedConf(n, map[string]string{"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "10M"}, nil)
	r := add(t, n, conf, "tp1", pod)
	testnet.StartIperf3(t, pod)
	podIP := r.IPs[0].Address.IP.String()
	// The shaper counts whole Ethernet frames; TCP goodput of full-size
	// segments is at most 1448/1514 of the rate.
	ceiling := 10e6 * 1448 / 1514
	for _, reverse := range []bool{false, true} {
		got := testnet.Iperf3Rate(t, n.NS, podIP, 4, reverse)
		dir := "into the pod"
		if reverse {
			dir = "out of the pod"
		}
		if got < 0.8*ceiling || got > 1.2*ceiling {
			t.Errorf("%s: %.2f Mbit/s, want %.2f +-20%%", dir, got/1e6, ceiling/1e6)
		} else {
			t.Logf("%s: %.2f Mbit/s at a 10 Mbit/s limit", dir, got/1e6)
		}
	}
	del(t, n, conf, "tp1", pod.Path)
	assertClean(t, n)
}

func TestShapingOnlyWhereAsked(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	// Plugin config defaults (reference keys) for egress only.
	conf := netConf(n, "1.1.0", func(c map[string]any) {
		c["egressRate"] = 5_000_000
		c["egressBurst"] = 100_000
	})
	add(t, n, conf, "eo", pod)
	rec := readRecord(t, n, "eo")
	if rec.Shaping == nil || rec.Shaping.Ingress != nil || rec.Shaping.Egress == nil || rec.Shaping.Egress.Source != "config" {
		t.Fatalf("shaping: %+v", rec.Shaping)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth); strings.Contains(q, "tbf") {
		t.Errorf("ingress shaped without input: %s", q)
	}
	del(t, n, conf, "eo", pod.Path)

	// No input at all: no tc object, no IFB.
	plain := netConf(n, "1.1.0", nil)
	add(t, n, plain, "none", pod)
	rec = readRecord(t, n, "none")
	if rec.Shaping != nil {
		t.Errorf("unshaped pod has shaping: %+v", rec.Shaping)
	}
	if out := n.Exec(t, "ip", "-o", "link", "show", "type", "ifb"); strings.TrimSpace(out) != "" {
		t.Errorf("IFB without egress shaping: %s", out)
	}
	del(t, n, plain, "none", pod.Path)
	assertClean(t, n)
}

func TestShapingBadInput(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	cases := []struct {
		name string
		conf []byte
		want string
	}{
		{"unparsable annotation", shapedConf(n, map[string]string{"kubernetes.io/ingress-bandwidth": "fast"}, nil), "kubernetes.io/ingress-bandwidth"},
		{"rate below 1k", shapedConf(n, map[string]string{"kubernetes.io/egress-bandwidth": "10"}, nil), "kubernetes.io/egress-bandwidth"},
		{"rate above 1P", shapedConf(n, map[string]string{"kubernetes.io/egress-bandwidth": "2P"}, nil), "2P"},
		{"negative burst", shapedConf(n, map[string]string{"kubernetes.io/ingress-bandwidth": "10M", "qoscni.io/ingress-burst": "-5k"}, nil), "qoscni.io/ingress-burst"},
		{"bad delay", shapedConf(n, map[string]string{"qoscni.io/max-queue-delay": "fast"}, nil), "qoscni.io/max-queue-delay"},
		{"runtime rate too big", shapedConf(n, nil, map[string]any{"ingressRate": uint64(2_000_000_000_000_000), "ingressBurst": 1}), "runtimeConfig.bandwidth.ingressRate"},
		{"config rate without burst", netConf(n, "1.1.0", func(c map[string]any) { c["ingressRate"] = 1_000_000 }), "ingressBurst"},
		{"negative runtime burst", shapedConf(n, nil, map[string]any{"egressRate": 1_000_000, "egressBurst": -1}), "egressBurst"},
		{"dscp out of range", shapedConf(n, map[string]string{"qoscni.io/dscp": "64"}, nil), "qoscni.io/dscp"},
		{"calico packet burst without rate", shapedConf(n, map[string]string{"qos.projectcalico.org/egressPacketBurst": "10"}, nil), "qos.projectcalico.org/egressPacketBurst"},
		{"connections beyond 32 bits", shapedConf(n, map[string]string{"qoscni.io/ingress-max-connections": "5G"}, nil), "qoscni.io/ingress-max-connections"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "bad", Netns: pod.Path, IfName: "eth0", Config: tc.conf})
			if !r.Failed || r.Err.Code != types.ErrInvalidNetworkConfig || !strings.Contains(r.Err.Msg, tc.want) {
				t.Fatalf("want error 7 naming %q, got %+v", tc.want, r.Err)
			}
		})
	}
	if out := n.Exec(t, "ip", "-o", "link"); strings.Contains(out, "qbr0") || strings.Contains(out, "veth") || strings.Contains(out, "ifb") {
		t.Errorf("rejected calls changed the node: %s", out)
	}
	if _, err := os.Stat(filepath.Join(n.IPAMDir, "qtest")); err == nil {
		entries, _ := os.ReadDir(filepath.Join(n.IPAMDir, "qtest"))
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "10.") {
				t.Errorf("rejected call reserved %s", e.Name())
			}
		}
	}
}

// qoscni swapped in for the reference bandwidth plugin after the reference
// bridge and ptp plugins, with the bandwidth plugin's config keys.
func TestChainedShapingAfterBridgeAndPtp(t *testing.T) {
	t.Parallel()
	requireRefPlugins(t, "ptp")
	for i, mainType := range []string{"bridge", "ptp"} {
		t.Run(mainType, func(t *testing.T) {
			n := testnet.NewNode(t)
			pod := n.NewPod(t)
			main := map[string]any{
				"cniVersion": "1.0.0", "name": "qtest", "type": mainType,
				"ipam": map[string]any{"type": "host-local", "ranges": []any{[]any{map[string]any{"subnet": "10.8" + string(rune('2'+i)) + ".0.0/24"}}}, "dataDir": filepath.Join(n.Dir, "hl")},
			}
			if mainType == "bridge" {
				main["bridge"] = "refbr0"
				main["isGateway"] = true
			}
			mainConf, _ := json.Marshal(main)
			env := []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=chs", "CNI_NETNS=" + pod.Path, "CNI_IFNAME=eth0", "CNI_PATH=/usr/lib/cni"}
			prev := runRefPlugin(t, n, mainType, env, mainConf)
			// The reference bandwidth plugin's config: defaults in the
			// plugin config and the runtime's values in runtimeConfig.
			base := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"qtest","type":"qoscni","stateDir":%q,
				"ingressRate":8000000,"ingressBurst":80000,"capabilities":{"bandwidth":true,"portMappings":true},
				"runtimeConfig":{"bandwidth":{"egressRate":4000000,"egressBurst":4294967295},
				"portMappings":[{"hostPort":8181,"containerPort":80,"protocol":"tcp"}]}}`, n.StateDir)
			conf := withPrev(t, []byte(base), prev)
			r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "chs", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained ADD")
			rec := readRecord(t, n, "chs")
			if rec.Mode != state.ModeChained || rec.Shaping == nil || rec.Shaping.Ingress == nil || rec.Shaping.Egress == nil {
				t.Fatalf("record: %+v %+v", rec, rec.Shaping)
			}
			if rec.Shaping.Ingress.Source != "config" || rec.Shaping.Egress.Source != "runtimeConfig" || rec.Shaping.Ingress.BurstBits != 80000 {
				t.Errorf("sources/burst: %+v %+v", rec.Shaping.Ingress, rec.Shaping.Egress)
			}
			if !strings.Contains(string(r.Stdout), rec.Shaping.IFB) || !strings.Contains(string(r.Stdout), "10.8") {
				t.Errorf("result must be prevResult plus the IFB: %s", r.Stdout)
			}
			q := n.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth)
			if !strings.Contains(q, "tbf 1: root") || !strings.Contains(q, "rate 8Mbit") || !strings.Contains(q, "clsact") {
				t.Errorf("%s qdiscs: %s", rec.HostVeth, q)
			}
			if q := n.Exec(t, "tc", "qdisc", "show", "dev", rec.Shaping.IFB); !strings.Contains(q, "rate 4Mbit") {
				t.Errorf("IFB qdiscs: %s", q)
			}
			if len(rec.Ports) != 1 || rec.Ports[0].HostPort != 8181 {
				t.Errorf("record ports: %+v", rec.Ports)
			}
			if m := n.Exec(t, "nft", "list", "map", "inet", "qoscni", "hostport4"); !strings.Contains(m, "8181") {
				t.Errorf("hostPort element missing: %s", m)
			}
			n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "chs", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained CHECK")
			n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "chs", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained DEL")
			if _, err := n.Try("ip", "link", "show", rec.Shaping.IFB); err == nil {
				t.Error("IFB survived chained DEL")
			}
			if m := n.Exec(t, "nft", "list", "map", "inet", "qoscni", "hostport4"); strings.Contains(m, "8181") {
				t.Errorf("hostPort element left after chained DEL: %s", m)
			}
			q = n.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth)
			if strings.Contains(q, "tbf") || strings.Contains(q, "clsact") {
				t.Errorf("our qdiscs left on the main plugin's veth: %s", q)
			}
			env[0] = "CNI_COMMAND=DEL"
			runRefPlugin(t, n, mainType, env, mainConf)
		})
	}
}

func runRefPlugin(t *testing.T, n *testnet.Node, plugin string, env []string, conf []byte) []byte {
	t.Helper()
	args := append([]string{"netns", "exec", n.Name, "env"}, env...)
	args = append(args, "/usr/lib/cni/"+plugin)
	cmd := execCommand("ip", args...)
	cmd.Stdin = strings.NewReader(string(conf))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("reference %s: %v: %s", plugin, err, out)
	}
	return out
}

func mustJSON(t *testing.T, r any) []byte {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustJSONValue(t *testing.T, v any) []byte { return mustJSON(t, v) }

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// TestPodCannotSizeKernelQueues: the reproductions of issue 14. A pod
// annotated 1G with a 10 s delay budget got a 1.25 GB bucket and queue on
// its host veth, and a 4G burst at 200M a 500 MB bucket; now the config's
// ceilings (or their defaults) bound both, and the record says what was
// clamped.
func TestPodCannotSizeKernelQueues(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	for i, tc := range []struct {
		anno      map[string]string
		ceilings  map[string]any
		burst     string // in tc's words
		limitMax  int    // bytes
		clampWhat string
	}{
		{map[string]string{"kubernetes.io/ingress-bandwidth": "1G", "qoscni.io/max-queue-delay": "10s"}, nil,
			"burst 12500000b", 12_500_000, "queue_delay"},
		{map[string]string{"kubernetes.io/ingress-bandwidth": "200M", "qoscni.io/ingress-burst": "4G"}, nil,
			"burst 16Mb", 16 << 20, "burst"},
		{map[string]string{"kubernetes.io/ingress-bandwidth": "200M", "qoscni.io/ingress-burst": "4G", "qoscni.io/max-queue-delay": "1s"},
			map[string]any{"maxQueueDelay": "20ms", "maxBurst": 2 << 20 * 8, "maxQueueBytes": 256 << 10},
			"burst 2Mb", 256 << 10, "burst"},
	} {
		pod := n.NewPod(t)
		cid := fmt.Sprintf("ceil%d", i)
		conf := shapedConf(n, tc.anno, nil)
		if tc.ceilings != nil {
			var m map[string]any
			if err := json.Unmarshal(conf, &m); err != nil {
				t.Fatal(err)
			}
			m["ceilings"] = tc.ceilings
			conf, _ = json.Marshal(m)
		}
		add(t, n, conf, cid, pod)
		rec := readRecord(t, n, cid)
		in := rec.Shaping.Ingress
		q := n.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth)
		if !strings.Contains(q, tc.burst) {
			t.Errorf("%v: want %s on the veth, have %s", tc.anno, tc.burst, q)
		}
		if in.LimitBytes > uint64(tc.limitMax) {
			t.Errorf("%v: queue limit %d B above %d B", tc.anno, in.LimitBytes, tc.limitMax)
		}
		found := false
		for _, c := range in.Clamped {
			found = found || c.Setting == tc.clampWhat
		}
		if !found {
			t.Errorf("%v: record does not say %s was clamped: %+v", tc.anno, tc.clampWhat, in.Clamped)
		}
		del(t, n, netConf(n, "1.1.0", nil), cid, pod.Path)
	}
	assertClean(t, n)
}
