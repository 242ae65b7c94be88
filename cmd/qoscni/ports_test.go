package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/testnet"
)

// portsConf is a standalone config with hostPort mappings in runtimeConfig.
func portsConf(n *testnet.Node, mappings ...map[string]any) []byte {
	return netConf(n, "1.1.0", func(c map[string]any) {
		c["capabilities"] = map[string]any{"portMappings": true}
		list := make([]any, 0, len(mappings))
		for _, m := range mappings {
			list = append(list, m)
		}
		c["runtimeConfig"] = map[string]any{"portMappings": list}
	})
}

// serve runs a one-line HTTP server in ns on port until the test ends.
func serve(t *testing.T, ns *testnet.NS, port int) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "python3", "-m", "http.server", fmt.Sprint(port), "--bind", "::")
	cmd.Dir = t.TempDir()
	if err := os.WriteFile(cmd.Dir+"/index.html", []byte("hello from "+ns.Name+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for i := 0; i < 100; i++ {
		if out, err := ns.Try("ss", "-ltn", fmt.Sprintf("sport = :%d", port)); err == nil && strings.Contains(out, fmt.Sprint(port)) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("server did not start")
}

func TestHostPortsThroughPlugin(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 missing")
	}
	n := testnet.NewNode(t)
	// A client machine on its own link to the node.
	client := testnet.NewNS(t, "qc")
	n.Exec(t, "ip", "link", "add", "qclient0", "type", "veth", "peer", "name", "eth0", "netns", client.Name)
	n.Exec(t, "ip", "addr", "add", "198.51.100.1/24", "dev", "qclient0")
	n.Exec(t, "ip", "link", "set", "qclient0", "up")
	client.Exec(t, "ip", "addr", "add", "198.51.100.2/24", "dev", "eth0")
	client.Exec(t, "ip", "link", "set", "eth0", "up")

	pod := n.NewPod(t)
	// As containerd sends it: Go field names, upper-case protocol.
	conf := portsConf(n, map[string]any{"HostPort": 8080, "ContainerPort": 80, "Protocol": "TCP"})
	r := add(t, n, conf, "hp1", pod)
	serve(t, pod, 80)
	out, err := client.Try("curl", "-s", "--max-time", "3", "http://198.51.100.1:8080/")
	if err != nil || !strings.Contains(out, "hello from "+pod.Name) {
		t.Fatalf("hostPort from the client: %v %q", err, out)
	}
	rec := readRecord(t, n, "hp1")
	if len(rec.Ports) != 2 || rec.Ports[0].HostPort != 8080 || rec.Ports[0].Protocol != "tcp" {
		t.Fatalf("record ports: %+v", rec.Ports)
	}
	chk := withPrev(t, conf, mustJSON(t, r))
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "hp1", Netns: pod.Path, IfName: "eth0", Config: chk}).MustSucceed(t, "CHECK")

	// Another pod asking for the same hostPort is refused, naming the owner.
	pod2 := n.NewPod(t)
	bad := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "hp2", Netns: pod2.Path, IfName: "eth0", Config: conf,
		Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=second"})
	if !bad.Failed || bad.Err.Code != types.ErrInvalidNetworkConfig || !strings.Contains(bad.Err.Msg, "8080") || !strings.Contains(bad.Err.Msg, "hp1") {
		t.Fatalf("conflicting hostPort: %+v", bad.Err)
	}
	if out := pod2.Exec(t, "ip", "-o", "link"); strings.Contains(out, "eth0") {
		t.Errorf("refused ADD left eth0 in the pod: %s", out)
	}

	// DEL without portMappings (containerd's second DEL sends none) still
	// removes the elements, from the state record.
	plain := netConf(n, "1.1.0", nil)
	del(t, n, plain, "hp1", pod.Path)
	if out := n.Exec(t, "nft", "list", "map", "inet", "qoscni", "hostport4"); strings.Contains(out, "8080") {
		t.Errorf("hostPort element left after DEL: %s", out)
	}
	del(t, n, plain, "hp1", "")
	assertClean(t, n)

	// Bad entries: error 7 naming the entry, nothing changed.
	for _, m := range []map[string]any{
		{"hostPort": 0, "containerPort": 80},
		{"hostPort": 70000, "containerPort": 80},
		{"hostPort": 80, "containerPort": 80, "protocol": "icmp"},
		{"hostPort": 80, "containerPort": 80, "hostIP": "10.0.0.300"},
	} {
		r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "bad", Netns: pod2.Path, IfName: "eth0", Config: portsConf(n, m)})
		if !r.Failed || r.Err.Code != types.ErrInvalidNetworkConfig || !strings.Contains(r.Err.Msg, "portMappings[0]") {
			t.Errorf("%v: want error 7 naming the entry, got %+v", m, r.Err)
		}
	}
	assertClean(t, n)
}

// Element left behind by a crashed DEL with no record: GC clears it.
func TestHostPortsGC(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	conf := portsConf(n, map[string]any{"hostPort": 9090, "containerPort": 90, "protocol": "udp"})
	add(t, n, conf, "gc1", pod)
	var c map[string]any
	_ = jsonUnmarshal(conf, &c)
	c["cni.dev/valid-attachments"] = []any{}
	gcConf := mustJSONValue(t, c)
	n.Invoke(t, testnet.Call{Command: "GC", Config: gcConf}).MustSucceed(t, "GC")
	if out := n.Exec(t, "nft", "list", "map", "inet", "qoscni", "hostport4"); strings.Contains(out, "9090") {
		t.Errorf("GC left the hostPort element: %s", out)
	}
	assertClean(t, n)
}
