package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/qoscni/qoscni/internal/testnet"
)

// netConf builds a standalone config for a node; mutate adjusts it.
func netConf(n *testnet.Node, cniVersion string, mutate func(map[string]any)) []byte {
	c := map[string]any{
		"cniVersion":       cniVersion,
		"name":             "qtest",
		"type":             "qoscni",
		"bridge":           "qbr0",
		"isDefaultGateway": true,
		"ipMasq":           true,
		"hairpinMode":      true,
		"stateDir":         n.StateDir,
		"ipam": map[string]any{
			"ranges": []any{
				[]any{map[string]any{"subnet": "10.77.0.0/24"}},
				[]any{map[string]any{"subnet": "fd77::/64"}},
			},
			"dataDir": n.IPAMDir,
		},
	}
	if mutate != nil {
		mutate(c)
	}
	b, err := json.Marshal(c)
	if err != nil {
		panic(err)
	}
	return b
}

// withPrev returns conf with prevResult set to a plugin result.
func withPrev(t *testing.T, conf, prev []byte) []byte {
	t.Helper()
	var c map[string]any
	if err := json.Unmarshal(conf, &c); err != nil {
		t.Fatal(err)
	}
	var p map[string]any
	if err := json.Unmarshal(prev, &p); err != nil {
		t.Fatal(err)
	}
	c["prevResult"] = p
	b, _ := json.Marshal(c)
	return b
}

func add(t *testing.T, n *testnet.Node, conf []byte, cid string, pod *testnet.NS) *current.Result {
	t.Helper()
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: cid, Netns: pod.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + cid + ";K8S_POD_UID=uid-" + cid, Config: conf}).MustSucceed(t, "ADD "+cid)
	var v struct {
		CNIVersion string `json:"cniVersion"`
	}
	_ = json.Unmarshal(conf, &v)
	res, err := version.NewResult(v.CNIVersion, r.Stdout)
	if err != nil {
		t.Fatalf("decode ADD result: %v\n%s", err, r.Stdout)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	return cur
}

func del(t *testing.T, n *testnet.Node, conf []byte, cid, netns string) {
	t.Helper()
	n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: cid, Netns: netns, IfName: "eth0", Config: conf}).MustSucceed(t, "DEL "+cid)
}

// requireRefPlugins returns the reference plugins' directory, skipping
// (failing, under QOSCNI_REQUIRE_ROOT) when a plugin the test runs is not
// installed.
func requireRefPlugins(t *testing.T, plugins ...string) string {
	t.Helper()
	const ref = "/usr/lib/cni"
	for _, p := range plugins {
		if _, err := os.Stat(filepath.Join(ref, p)); err != nil {
			if os.Getenv(testnet.RequireRootEnv) != "" {
				t.Fatalf("reference plugin %s missing (apt-get install containernetworking-plugins): %v", p, err)
			}
			t.Skip("reference plugins not installed")
		}
	}
	return ref
}

// assertClean checks that the node holds nothing of any attachment.
func assertClean(t *testing.T, n *testnet.Node) {
	t.Helper()
	// qoscni's devices: host veths "qv...", IFBs "qi...".
	for _, l := range strings.Split(n.Exec(t, "ip", "-o", "link", "show"), "\n") {
		f := strings.Fields(l)
		if len(f) > 1 && (strings.HasPrefix(f[1], "qv") || strings.HasPrefix(f[1], "qi")) {
			t.Errorf("device left in node: %s", l)
		}
	}
	for _, dir := range []string{filepath.Join(n.StateDir, "qtest"), filepath.Join(n.IPAMDir, "qtest")} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			name := e.Name()
			if e.IsDir() {
				sub, _ := os.ReadDir(filepath.Join(dir, name))
				if len(sub) > 0 {
					t.Errorf("%s/%s not empty: %d entries", dir, name, len(sub))
				}
				continue
			}
			if name == "lock" || name == ".lock" || strings.HasPrefix(name, "last_reserved_ip") {
				continue
			}
			t.Errorf("left in %s: %s", dir, name)
		}
	}
	for _, set := range []string{"pkt-egress4", "pkt-ingress4", "pkt-drop-egress4", "pkt-drop-ingress4", "conn-egress4", "conn-ingress4", "pkt-egress6", "pkt-ingress6", "pkt-drop-egress6", "pkt-drop-ingress6", "conn-egress6", "conn-ingress6", "dscp4", "dscp6"} {
		kind := "set"
		if strings.HasPrefix(set, "dscp") {
			kind = "map"
		}
		if out, err := n.Try("nft", "list", kind, "inet", "qoscni", set); err == nil && strings.Contains(out, "elements") {
			t.Errorf("control elements left: %s", out)
		}
	}
	for _, set := range []string{"np-pending4", "np-pending6"} {
		if out, err := n.Try("nft", "list", "set", "inet", "qoscni", set); err == nil && strings.Contains(out, "elements") {
			t.Errorf("NetworkPolicy pending elements left: %s", out)
		}
	}
	if out, err := n.Try("nft", "list", "set", "inet", "qoscni", "masq-src4"); err == nil && strings.Contains(out, "elements") {
		t.Errorf("masquerade elements left: %s", out)
	}
	if out, err := n.Try("nft", "list", "set", "inet", "qoscni", "masq-src6"); err == nil && strings.Contains(out, "elements") {
		t.Errorf("masquerade elements left: %s", out)
	}
}

func podAddrs(t *testing.T, pod *testnet.NS) string {
	return pod.Exec(t, "ip", "-o", "addr", "show", "dev", "eth0")
}

func TestAddCheckDelEveryVersion(t *testing.T) {
	for _, ver := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(ver, func(t *testing.T) {
			t.Parallel()
			n := testnet.NewNode(t)
			pod := n.NewPod(t)
			conf := netConf(n, ver, nil)
			r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "c1", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "ADD")
			var head struct {
				CNIVersion string `json:"cniVersion"`
			}
			if err := json.Unmarshal(r.Stdout, &head); err != nil || head.CNIVersion != ver {
				t.Fatalf("result cniVersion %q, want %q (%v)", head.CNIVersion, ver, err)
			}
			res, err := version.NewResult(ver, r.Stdout)
			if err != nil {
				t.Fatal(err)
			}
			cur, err := current.NewResultFromResult(res)
			if err != nil {
				t.Fatal(err)
			}
			if len(cur.IPs) != 2 || len(cur.Interfaces) != 3 {
				t.Fatalf("want 2 IPs and 3 interfaces, got %s", r.Stdout)
			}
			addrs := podAddrs(t, pod)
			for _, ipc := range cur.IPs {
				if !strings.Contains(addrs, ipc.Address.String()) {
					t.Errorf("pod lacks %s: %s", ipc.Address.String(), addrs)
				}
			}
			pod.Exec(t, "ping", "-c1", "-W2", "10.77.0.1")
			pod.Exec(t, "ping", "-6", "-c1", "-W2", "fd77::1")

			chk := n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "c1", Netns: pod.Path, IfName: "eth0", Config: withPrev(t, conf, r.Stdout)})
			if ver < "0.4.0" {
				if !chk.Failed || chk.Err.Code != types.ErrIncompatibleCNIVersion {
					t.Fatalf("CHECK on %s: want error 1, got %+v", ver, chk.Err)
				}
			} else {
				chk.MustSucceed(t, "CHECK")
				// CHECK notices drift.
				pod.Exec(t, "ip", "addr", "del", cur.IPs[0].Address.String(), "dev", "eth0")
				bad := n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "c1", Netns: pod.Path, IfName: "eth0", Config: withPrev(t, conf, r.Stdout)})
				if !bad.Failed || !strings.Contains(bad.Err.Msg, cur.IPs[0].Address.String()) {
					t.Fatalf("CHECK after removing an address: want failure naming it, got %+v", bad.Err)
				}
			}
			del(t, n, withPrev(t, conf, r.Stdout), "c1", pod.Path)
			del(t, n, conf, "c1", "")
			assertClean(t, n)
		})
	}
}

func TestDualStackMTUPodToPod(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	conf := netConf(n, "1.1.0", func(c map[string]any) { c["mtu"] = 1400 })
	p1, p2 := n.NewPod(t), n.NewPod(t)
	r1 := add(t, n, conf, "a1", p1)
	r2 := add(t, n, conf, "a2", p2)
	for _, pod := range []*testnet.NS{p1, p2} {
		if out := pod.Exec(t, "ip", "-o", "link", "show", "eth0"); !strings.Contains(out, "mtu 1400") {
			t.Errorf("pod MTU: %s", out)
		}
	}
	host := r1.Interfaces[1].Name
	if out := n.Exec(t, "ip", "-o", "link", "show", host); !strings.Contains(out, "mtu 1400") || !strings.Contains(out, "master qbr0") {
		t.Errorf("host veth: %s", out)
	}
	if r1.Interfaces[2].Mtu != 1400 {
		t.Errorf("result MTU %d", r1.Interfaces[2].Mtu)
	}
	for i := range r2.IPs {
		flag := "-4"
		if r2.IPs[i].Address.IP.To4() == nil {
			flag = "-6"
		}
		p1.Exec(t, "ping", flag, "-c1", "-W2", r2.IPs[i].Address.IP.String())
	}
	// A full-size packet crosses without fragmentation at the configured MTU.
	p1.Exec(t, "ping", "-4", "-c1", "-W2", "-M", "do", "-s", "1372", r2.IPs[0].Address.IP.String())
	if _, err := p1.Try("ping", "-4", "-c1", "-W1", "-M", "do", "-s", "1373", r2.IPs[0].Address.IP.String()); err == nil {
		t.Error("a packet above the MTU went through unfragmented")
	}
	// Gateway addresses on the bridge, forwarding on.
	br := n.Exec(t, "ip", "-o", "addr", "show", "dev", "qbr0")
	if !strings.Contains(br, "10.77.0.1/24") || !strings.Contains(br, "fd77::1/64") {
		t.Errorf("bridge addresses: %s", br)
	}
	if v := strings.TrimSpace(n.Exec(t, "cat", "/proc/sys/net/ipv4/ip_forward")); v != "1" {
		t.Errorf("ip_forward = %s", v)
	}
	// Pod to node (the bridge address) both families.
	p2.Exec(t, "ping", "-6", "-c1", "-W2", "fd77::1")
	del(t, n, conf, "a1", p1.Path)
	del(t, n, conf, "a2", p2.Path)
	assertClean(t, n)
}

func TestHairpinAndPromisc(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	conf := netConf(n, "1.0.0", func(c map[string]any) { c["promiscMode"] = true })
	pod := n.NewPod(t)
	r := add(t, n, conf, "h1", pod)
	host := r.Interfaces[1].Name
	if v := strings.TrimSpace(n.Exec(t, "cat", "/sys/class/net/"+host+"/brport/hairpin_mode")); v != "1" {
		t.Errorf("hairpin_mode = %s", v)
	}
	if out := n.Exec(t, "ip", "-o", "link", "show", "qbr0"); !strings.Contains(out, "PROMISC") {
		t.Errorf("bridge not promiscuous: %s", out)
	}
	del(t, n, conf, "h1", pod.Path)

	off := netConf(n, "1.0.0", func(c map[string]any) { c["hairpinMode"] = false })
	r = add(t, n, off, "h2", pod)
	if v := strings.TrimSpace(n.Exec(t, "cat", "/sys/class/net/"+r.Interfaces[1].Name+"/brport/hairpin_mode")); v != "0" {
		t.Errorf("hairpin_mode with hairpinMode=false: %s", v)
	}
	del(t, n, off, "h2", pod.Path)
	assertClean(t, n)
}

func TestDelAsContainerdDoes(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	conf := netConf(n, "1.1.0", nil)
	pod := n.NewPod(t)
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "d1", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "ADD")
	// First DEL: netns and prevResult. Second, at sandbox removal: no netns, no prevResult.
	del(t, n, withPrev(t, conf, r.Stdout), "d1", pod.Path)
	del(t, n, conf, "d1", "")
	assertClean(t, n)

	// The netns vanished before any DEL: the single DEL without it must still
	// release everything.
	pod2 := n.NewPod(t)
	add(t, n, conf, "d2", pod2)
	testnet.Run(t, "ip", "netns", "del", pod2.Name)
	del(t, n, conf, "d2", pod2.Path)
	del(t, n, conf, "d2", "")
	assertClean(t, n)

	// DEL of something never added.
	del(t, n, conf, "never-added", "")
}

func TestStatusAndExhaustion(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	conf := netConf(n, "1.1.0", func(c map[string]any) {
		c["ipam"] = map[string]any{"ranges": []any{[]any{map[string]any{"subnet": "10.78.0.0/30"}}}, "dataDir": n.IPAMDir}
	})
	n.Invoke(t, testnet.Call{Command: "STATUS", Config: conf}).MustSucceed(t, "STATUS while free")
	pod := n.NewPod(t)
	add(t, n, conf, "s1", pod)
	st := n.Invoke(t, testnet.Call{Command: "STATUS", Config: conf})
	if !st.Failed || st.Err.Code != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS with a full range: want error 50, got %+v", st.Err)
	}
	pod2 := n.NewPod(t)
	full := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "s2", Netns: pod2.Path, IfName: "eth0", Config: conf})
	if !full.Failed {
		t.Fatal("ADD into a full range succeeded")
	}
	if out := pod2.Exec(t, "ip", "-o", "link"); strings.Contains(out, "eth0") {
		t.Errorf("failed ADD left eth0 in the pod: %s", out)
	}
	del(t, n, conf, "s1", pod.Path)
	n.Invoke(t, testnet.Call{Command: "STATUS", Config: conf}).MustSucceed(t, "STATUS after release")
	assertClean(t, n)
	// STATUS does not exist before 1.1.0.
	old := netConf(n, "1.0.0", nil)
	if r := n.Invoke(t, testnet.Call{Command: "STATUS", Config: old}); !r.Failed || r.Err.Code != types.ErrIncompatibleCNIVersion {
		t.Fatalf("STATUS on 1.0.0: want error 1, got %+v", r.Err)
	}
}

// TestStatusBridgeNetfilter: br_netfilter's sysctl set to 0 in the node
// namespace comes back to 1 at the next STATUS; where the plugin cannot
// set it (its /proc/sys read only), STATUS and ADD fail with error 51
// naming the module, the sysctl and the fix, and ADD leaves nothing. A
// chained entry (no IPAM) leaves br_netfilter to the main plugin.
func TestStatusBridgeNetfilter(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	requireBridgeNetfilter(t, n)
	conf := netConf(n, "1.1.0", nil)

	bridgeNFOff(t, n)
	r := n.Invoke(t, testnet.Call{Command: "STATUS", Config: conf}).MustSucceed(t, "STATUS")
	if v := bridgeNF(t, n); v != "1 1" {
		t.Errorf("after STATUS: %s, want 1 1", v)
	}
	if !strings.Contains(string(r.Stderr), "net.bridge.bridge-nf-call-iptables") {
		t.Errorf("STATUS set it back without a word on stderr: %q", r.Stderr)
	}

	bridgeNFOff(t, n)
	st := n.Invoke(t, testnet.Call{Command: "STATUS", Config: conf, ReadOnlyProcSys: true})
	if !st.Failed || st.Err.Code != types.ErrLimitedConnectivity {
		t.Fatalf("STATUS with bridge-nf-call-iptables 0 and /proc/sys read only: want error 51, got %+v", st.Err)
	}
	for _, w := range []string{"br_netfilter", "net.bridge.bridge-nf-call-iptables", "is 0", "cannot be set to 1", "read-only file system",
		"sysctl -w net.bridge.bridge-nf-call-iptables=1", "/etc/sysctl.d/", "docs/install.md"} {
		if !strings.Contains(st.Err.Msg, w) {
			t.Errorf("STATUS message does not say %q: %s", w, st.Err.Msg)
		}
	}
	t.Logf("STATUS: %d %s", st.Err.Code, st.Err.Msg)
	pod := n.NewPod(t)
	a := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "nf", Netns: pod.Path, IfName: "eth0", Config: conf, ReadOnlyProcSys: true})
	if !a.Failed || a.Err.Code != st.Err.Code || a.Err.Msg != st.Err.Msg {
		t.Errorf("ADD: want STATUS's error, got %+v", a.Err)
	}
	if out := pod.Exec(t, "ip", "-o", "link"); strings.Contains(out, "eth0") {
		t.Errorf("refused ADD left eth0 in the pod: %s", out)
	}
	assertClean(t, n)

	chained := []byte(`{"cniVersion":"1.1.0","name":"qtest","type":"qoscni","stateDir":"` + n.StateDir + `"}`)
	n.Invoke(t, testnet.Call{Command: "STATUS", Config: chained, ReadOnlyProcSys: true}).MustSucceed(t, "chained STATUS")
	n.Invoke(t, testnet.Call{Command: "STATUS", Config: chained}).MustSucceed(t, "chained STATUS")
	if v := bridgeNF(t, n); v != "0 0" {
		t.Errorf("chained STATUS changed the node's br_netfilter sysctls to %s", v)
	}
	n.Invoke(t, testnet.Call{Command: "STATUS", Config: conf}).MustSucceed(t, "STATUS once it can set them")
	if v := bridgeNF(t, n); v != "1 1" {
		t.Errorf("after STATUS: %s, want 1 1", v)
	}
}

func TestGCReleasesStaleAttachments(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	conf := netConf(n, "1.1.0", nil)
	keep, stale := n.NewPod(t), n.NewPod(t)
	rk := add(t, n, conf, "keep", keep)
	rs := add(t, n, conf, "stale", stale)
	var c map[string]any
	_ = json.Unmarshal(conf, &c)
	c["cni.dev/valid-attachments"] = []any{map[string]any{"containerID": "keep", "ifname": "eth0"}}
	gcConf, _ := json.Marshal(c)
	n.Invoke(t, testnet.Call{Command: "GC", Config: gcConf}).MustSucceed(t, "GC")

	if _, err := n.Try("ip", "link", "show", rs.Interfaces[1].Name); err == nil {
		t.Error("stale attachment's veth survived GC")
	}
	if _, err := n.Try("ip", "link", "show", rk.Interfaces[1].Name); err != nil {
		t.Error("valid attachment's veth removed by GC")
	}
	for _, ipc := range rs.IPs {
		if _, err := os.Stat(filepath.Join(n.IPAMDir, "qtest", ipc.Address.IP.String())); err == nil {
			t.Errorf("stale address %s still reserved", ipc.Address.IP)
		}
	}
	if _, err := os.Stat(filepath.Join(n.StateDir, "qtest", "stale_eth0.json")); err == nil {
		t.Error("stale state record survived GC")
	}
	if out := n.Exec(t, "nft", "list", "set", "inet", "qoscni", "masq-src4"); strings.Contains(out, rs.IPs[0].Address.IP.String()) ||
		!strings.Contains(out, rk.IPs[0].Address.IP.String()) {
		t.Errorf("masquerade set after GC: %s", out)
	}
	keep.Exec(t, "ping", "-c1", "-W2", "10.77.0.1")
	del(t, n, conf, "keep", keep.Path)
	assertClean(t, n)
}

func TestBadInputChangesNothing(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	good := netConf(n, "1.1.0", nil)
	cases := []struct {
		name   string
		conf   []byte
		env    []string
		code   uint
		inMsg  string
		noArgs bool
	}{
		{name: "malformed JSON", conf: []byte(`{"cniVersion":"1.1.0","name":"qtest","type":"qoscni",`), code: types.ErrDecodingFailure},
		{name: "mtu too small", conf: netConf(n, "1.1.0", func(c map[string]any) { c["mtu"] = 500 }), code: types.ErrInvalidNetworkConfig, inMsg: "mtu 500"},
		{name: "mtu wrong type", conf: netConf(n, "1.1.0", func(c map[string]any) { c["mtu"] = "big" }), code: types.ErrInvalidNetworkConfig, inMsg: "mtu"},
		{name: "bridge name too long", conf: netConf(n, "1.1.0", func(c map[string]any) { c["bridge"] = "abcdefghijklmnopq" }), code: types.ErrInvalidNetworkConfig, inMsg: "bridge"},
		{name: "bad subnet", conf: netConf(n, "1.1.0", func(c map[string]any) {
			c["ipam"] = map[string]any{"ranges": []any{[]any{map[string]any{"subnet": "10.0.0.0/33"}}}, "dataDir": n.IPAMDir}
		}), code: types.ErrInvalidNetworkConfig, inMsg: "10.0.0.0/33"},
		{name: "rangeStart outside subnet", conf: netConf(n, "1.1.0", func(c map[string]any) {
			c["ipam"] = map[string]any{"ranges": []any{[]any{map[string]any{"subnet": "10.9.0.0/24", "rangeStart": "10.8.0.5"}}}, "dataDir": n.IPAMDir}
		}), code: types.ErrInvalidNetworkConfig, inMsg: "rangeStart"},
		{name: "no ranges", conf: netConf(n, "1.1.0", func(c map[string]any) {
			c["ipam"] = map[string]any{"type": "qoscni", "dataDir": n.IPAMDir}
		}), code: types.ErrInvalidNetworkConfig, inMsg: "ranges"},
		{name: "bad hostPort", conf: netConf(n, "1.1.0", func(c map[string]any) {
			c["runtimeConfig"] = map[string]any{"portMappings": []any{map[string]any{"hostPort": 70000, "containerPort": 80}}}
		}), code: types.ErrInvalidNetworkConfig, inMsg: "hostPort 70000"},
		{name: "hostPort twice", conf: netConf(n, "1.1.0", func(c map[string]any) {
			c["runtimeConfig"] = map[string]any{"portMappings": []any{
				map[string]any{"hostPort": 8080, "containerPort": 80}, map[string]any{"hostPort": 8080, "containerPort": 81}}}
		}), code: types.ErrInvalidNetworkConfig, inMsg: "8080"},
		{name: "prevResult IP without address", conf: netConf(n, "1.1.0", func(c map[string]any) {
			c["prevResult"] = map[string]any{"cniVersion": "1.1.0", "ips": []any{map[string]any{}}}
		}), code: types.ErrInvalidNetworkConfig, inMsg: "prevResult.ips[0].address"},
		{name: "unsupported version", conf: netConf(n, "0.2.0", nil), code: types.ErrIncompatibleCNIVersion},
		{name: "future version", conf: netConf(n, "9.9.9", nil), code: types.ErrIncompatibleCNIVersion},
		{name: "missing container ID", conf: good, noArgs: true, code: types.ErrInvalidEnvironmentVariables, inMsg: "CNI_CONTAINERID"},
		{name: "bad CNI_ARGS", conf: good, env: []string{"CNI_ARGS=K8S_POD_NAME"}, code: types.ErrInvalidEnvironmentVariables, inMsg: "CNI_ARGS"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			call := testnet.Call{Command: "ADD", ContainerID: "bad", Netns: pod.Path, IfName: "eth0", Config: tc.conf, Env: tc.env}
			if tc.noArgs {
				call.ContainerID = ""
			}
			r := n.Invoke(t, call)
			if !r.Failed {
				t.Fatalf("ADD succeeded: %s", r.Stdout)
			}
			if r.Err.Code != tc.code {
				t.Fatalf("code %d (%s), want %d", r.Err.Code, r.Err.Msg, tc.code)
			}
			if !strings.Contains(r.Err.Msg+" "+r.Err.Details, tc.inMsg) {
				t.Fatalf("message %q does not name %q", r.Err.Msg, tc.inMsg)
			}
		})
	}
	// Nothing was created on the node or in the pod.
	if out := n.Exec(t, "ip", "-o", "link"); strings.Contains(out, "qbr0") || strings.Contains(out, "veth") {
		t.Errorf("rejected calls changed the node: %s", out)
	}
	if out, err := n.Try("nft", "list", "tables"); err != nil || strings.Contains(out, "qoscni") {
		t.Errorf("rejected calls created nftables state: %s %v", out, err)
	}
	if _, err := os.Stat(n.StateDir); err == nil {
		t.Error("rejected calls created the state dir")
	}
	if out := pod.Exec(t, "ip", "-o", "link"); strings.Contains(out, "eth0") {
		t.Errorf("rejected calls changed the pod: %s", out)
	}
}

func TestFailedAddRollsBack(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	// The route's gateway is not on any pod subnet, so ADD fails after the
	// address, the bridge and the veth exist.
	conf := netConf(n, "1.1.0", func(c map[string]any) {
		ip := c["ipam"].(map[string]any)
		ip["routes"] = []any{map[string]any{"dst": "192.0.2.0/24", "gw": "198.51.100.1"}}
	})
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "rb", Netns: pod.Path, IfName: "eth0", Config: conf})
	if !r.Failed || !strings.Contains(r.Err.Msg, "192.0.2.0/24") {
		t.Fatalf("want a route failure, got %+v", r.Err)
	}
	assertClean(t, n)
	if out := pod.Exec(t, "ip", "-o", "link"); strings.Contains(out, "eth0") {
		t.Errorf("pod still has eth0: %s", out)
	}
	// A bridge name taken by a non-bridge fails after IPAM allocated.
	n.Exec(t, "ip", "link", "del", "qbr0")
	n.Exec(t, "ip", "link", "add", "qbr0", "type", "veth", "peer", "name", "qbr0peer")
	t.Cleanup(func() { _, _ = n.Try("ip", "link", "del", "qbr0") })
	r = n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "rb", Netns: pod.Path, IfName: "eth0", Config: netConf(n, "1.1.0", nil)})
	if !r.Failed || r.Err.Code != types.ErrInvalidNetworkConfig || !strings.Contains(r.Err.Msg, "qbr0") {
		t.Fatalf("want error 7 naming the bridge, got %+v", r.Err)
	}
	n.Exec(t, "ip", "link", "del", "qbr0")
	assertClean(t, n)
}

func TestInterfaceNameTakenInPod(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	pod.Exec(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "x", Netns: pod.Path, IfName: "eth0", Config: netConf(n, "1.1.0", nil)})
	if !r.Failed || !strings.Contains(r.Err.Msg, "eth0") {
		t.Fatalf("want failure naming eth0, got %+v", r.Err)
	}
	pod.Exec(t, "ip", "link", "del", "eth0")
	assertClean(t, n)
}

func TestConcurrentAdds(t *testing.T) {
	t.Parallel()
	const pods = 50
	n := testnet.NewNode(t)
	conf := netConf(n, "1.1.0", nil)
	nss := make([]*testnet.NS, pods)
	for i := range nss {
		nss[i] = n.NewPod(t)
	}
	results := make([]testnet.Result, pods)
	var wg sync.WaitGroup
	for i := 0; i < pods; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i] = n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: fmt.Sprintf("cc%02d", i), Netns: nss[i].Path, IfName: "eth0", Config: conf})
		}(i)
	}
	wg.Wait()
	seen := map[string]int{}
	for i, r := range results {
		if r.Failed {
			t.Fatalf("ADD %d: %+v", i, r.Err)
		}
		res, err := version.NewResult("1.1.0", r.Stdout)
		if err != nil {
			t.Fatal(err)
		}
		cur, _ := current.NewResultFromResult(res)
		for _, ipc := range cur.IPs {
			if j, dup := seen[ipc.Address.IP.String()]; dup {
				t.Fatalf("address %s given to %d and %d", ipc.Address.IP, j, i)
			}
			seen[ipc.Address.IP.String()] = i
		}
	}
	if len(seen) != 2*pods {
		t.Fatalf("%d distinct addresses, want %d", len(seen), 2*pods)
	}
	errs := make([]*types.Error, pods)
	for i := 0; i < pods; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r := n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: fmt.Sprintf("cc%02d", i), Netns: nss[i].Path, IfName: "eth0", Config: conf})
			errs[i] = r.Err
		}(i)
	}
	wg.Wait()
	for i, e := range errs {
		if e != nil {
			t.Errorf("DEL %d: %+v", i, e)
		}
	}
	assertClean(t, n)
}

func TestDelegatedIPAM(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	ref := "/usr/lib/cni"
	if _, err := os.Stat(filepath.Join(ref, "host-local")); err != nil {
		if os.Getenv(testnet.RequireRootEnv) != "" {
			t.Fatalf("host-local plugin missing (apt-get install containernetworking-plugins): %v", err)
		}
		t.Skip("host-local plugin not installed")
	}
	hlDir := filepath.Join(n.Dir, "host-local")
	// Debian's host-local (1.1.x) speaks up to 1.0.0.
	conf := netConf(n, "1.0.0", func(c map[string]any) {
		c["ipam"] = map[string]any{"type": "host-local", "ranges": []any{[]any{map[string]any{"subnet": "10.79.0.0/24"}}}, "dataDir": hlDir}
	})
	pod := n.NewPod(t)
	path := filepath.Dir(testnet.PluginBinary(t)) + ":" + ref
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "dg", Netns: pod.Path, IfName: "eth0", Config: conf, Path: path}).MustSucceed(t, "ADD")
	if !strings.Contains(string(r.Stdout), "10.79.0.2/24") {
		t.Fatalf("result: %s", r.Stdout)
	}
	pod.Exec(t, "ping", "-c1", "-W2", "10.79.0.1")
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "dg", Netns: pod.Path, IfName: "eth0", Config: withPrev(t, conf, r.Stdout), Path: path}).MustSucceed(t, "CHECK")
	n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "dg", Netns: pod.Path, IfName: "eth0", Config: conf, Path: path}).MustSucceed(t, "DEL")
	if _, err := os.Stat(filepath.Join(hlDir, "qtest", "10.79.0.2")); err == nil {
		t.Error("host-local reservation survived DEL")
	}
	assertClean(t, n)
}

// requireBridgeNetfilter: a standalone ADD needs br_netfilter's sysctls
// in the node namespace (the module loaded; per namespace since Linux
// 5.3). Without them it fails, as every standalone test here would: this
// says why.
func requireBridgeNetfilter(t *testing.T, n *testnet.Node) {
	t.Helper()
	if _, err := n.Try("test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables"); err == nil {
		return
	}
	msg := "no /proc/sys/net/bridge/bridge-nf-call-iptables in the node namespace: br_netfilter is not loaded on this machine, " +
		"and a standalone ADD refuses to wire pods whose Services would break (modprobe br_netfilter; make deps does)"
	if os.Getenv(testnet.RequireRootEnv) != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// bridgeNF reads both br_netfilter sysctls of the node.
func bridgeNF(t *testing.T, n *testnet.Node) string {
	t.Helper()
	return strings.Join(strings.Fields(n.Exec(t, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")), " ")
}

func bridgeNFOff(t *testing.T, n *testnet.Node) {
	t.Helper()
	n.Exec(t, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0")
}

func TestPodSettingsAndBridgeNetfilter(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	requireBridgeNetfilter(t, n)
	conf := netConf(n, "1.1.0", func(c map[string]any) {
		c["container_settings"] = map[string]any{"allow_ip_forwarding": true}
	})
	// A fresh namespace starts with both at 1: at 0, the test sees ADD
	// set them.
	bridgeNFOff(t, n)
	pod := n.NewPod(t)
	add(t, n, conf, "fw", pod)
	if v := strings.TrimSpace(pod.Exec(t, "cat", "/proc/sys/net/ipv4/ip_forward")); v != "1" {
		t.Errorf("pod ip_forward = %s", v)
	}
	if v := strings.TrimSpace(pod.Exec(t, "cat", "/proc/sys/net/ipv6/conf/all/forwarding")); v != "1" {
		t.Errorf("pod ipv6 forwarding = %s", v)
	}
	if v := bridgeNF(t, n); v != "1 1" {
		t.Errorf("node bridge-nf-call-iptables, -ip6tables after ADD = %s, want 1 1", v)
	}
	// The state record carries the pod identity for the agent.
	b, err := os.ReadFile(filepath.Join(n.StateDir, "qtest", "fw_eth0.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"uid": "uid-fw"`) || !strings.Contains(string(b), `"namespace": "default"`) {
		t.Errorf("state record: %s", b)
	}
	st, _ := os.Stat(filepath.Join(n.StateDir, "qtest", "fw_eth0.json"))
	if st.Mode().Perm() != 0o600 {
		t.Errorf("state record mode %v", st.Mode().Perm())
	}
	dst, _ := os.Stat(filepath.Join(n.StateDir, "qtest"))
	if dst.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode %v", dst.Mode().Perm())
	}
	del(t, n, conf, "fw", pod.Path)
	assertClean(t, n)
}

var (
	_           = net.IPv4len
	execCommand = exec.Command
)

func TestChainedAfterReferenceBridge(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	prev, delMain := refBridgeAdd(t, n, pod, "ch", "10.81.0.0/24")
	conf := withPrev(t, []byte(fmt.Sprintf(`{"cniVersion":"1.0.0","name":"qtest","type":"qoscni","stateDir":%q}`, n.StateDir)), prev)
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "ch", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained ADD")
	if !strings.Contains(string(r.Stdout), "10.81.0.2/24") {
		t.Fatalf("chained ADD must pass prevResult through: %s", r.Stdout)
	}
	b, err := os.ReadFile(filepath.Join(n.StateDir, "qtest", "ch_eth0.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		Mode     string `json:"mode"`
		HostVeth string `json:"hostVeth"`
	}
	_ = json.Unmarshal(b, &rec)
	peer := strings.TrimSpace(n.Exec(t, "ls", "/sys/class/net/refbr0/brif"))
	if rec.Mode != "chained" || rec.HostVeth != peer {
		t.Fatalf("record %+v, want chained on %q", rec, peer)
	}
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "ch", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained CHECK")
	n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "ch", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained DEL")
	if _, err := os.Stat(filepath.Join(n.StateDir, "qtest", "ch_eth0.json")); err == nil {
		t.Error("chained DEL left the record")
	}
	// qoscni must not have touched the main plugin's veth.
	if _, err := n.Try("ip", "link", "show", peer); err != nil {
		t.Errorf("chained DEL removed the main plugin's veth %s", peer)
	}
	delMain()
}

// refBridgeAdd runs the reference bridge plugin's ADD for container cid in
// pod (bridge refbr0, host-local on subnet) as the first plugin of a
// chain, and returns its result and its DEL.
func refBridgeAdd(t *testing.T, n *testnet.Node, pod *testnet.NS, cid, subnet string) ([]byte, func()) {
	t.Helper()
	ref := requireRefPlugins(t, "bridge")
	mainConf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "qtest", "type": "bridge", "bridge": "refbr0", "isGateway": true,
		"ipam": map[string]any{"type": "host-local", "ranges": []any{[]any{map[string]any{"subnet": subnet}}}, "dataDir": filepath.Join(n.Dir, "hl")},
	})
	env := []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=" + cid, "CNI_NETNS=" + pod.Path, "CNI_IFNAME=eth0", "CNI_PATH=" + ref}
	prev := runRefPlugin(t, n, "bridge", env, mainConf)
	return prev, func() {
		env[0] = "CNI_COMMAND=DEL"
		runRefPlugin(t, n, "bridge", env, mainConf)
	}
}
