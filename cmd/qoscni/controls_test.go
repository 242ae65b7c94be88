package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/testnet"
)

// TestControlsThroughPlugin: a pod's packet-rate, connection and DSCP
// annotations (qoscni's and Calico's names) become elements keyed by its
// address at ADD, CHECK names one removed by hand, and DEL removes them.
func TestControlsThroughPlugin(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	conf := shapedConf(n, map[string]string{
		"qoscni.io/egress-max-connections":        "20",
		"qos.projectcalico.org/ingressPacketRate": "2k",
		"qos.projectcalico.org/dscp":              "EF",
	}, nil)
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "ctl", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "ADD")
	rec := readRecord(t, n, "ctl")
	c := rec.Controls
	if c == nil || c.Egress == nil || c.Egress.MaxConnections != 20 || c.Ingress == nil || c.Ingress.PacketRate != 2000 ||
		c.Ingress.PacketBurst != 5 || c.DSCP == nil || *c.DSCP != 46 {
		t.Fatalf("record controls: %+v", c)
	}
	ip := strings.SplitN(rec.IPs[0], "/", 2)[0]
	table := n.Exec(t, "nft", "list", "table", "inet", "qoscni")
	// nft leaves out a burst of 5 packets, its default. The counter
	// before the limit counts what the rate meets.
	if !regexp.MustCompile(regexp.QuoteMeta(ip) + ` counter packets \d+ bytes \d+ limit rate over 2000/second comment`).MatchString(table) {
		t.Errorf("no packet rate for %s in\n%s", ip, table)
	}
	for _, want := range []string{
		ip + " ct count over 20 counter",
		": jump dscp-46",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("no %q in\n%s", want, table)
		}
	}
	chk := withPrev(t, conf, r.Stdout)
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "ctl", Netns: pod.Path, IfName: "eth0", Config: chk}).MustSucceed(t, "CHECK")
	n.Exec(t, "nft", "delete", "element", "inet", "qoscni", "conn-egress4", "{", ip, "}")
	bad := n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "ctl", Netns: pod.Path, IfName: "eth0", Config: chk})
	if !bad.Failed || !strings.Contains(bad.Err.Msg, "conn-egress4") {
		t.Fatalf("CHECK after an element went: %+v", bad.Err)
	}
	del(t, n, netConf(n, "1.1.0", nil), "ctl", pod.Path)
	assertClean(t, n)
}

// TestControlsChained: after the reference bridge plugin, the controls
// key on the address of the main plugin's result, and DEL leaves nothing.
func TestControlsChained(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	prev, delMain := refBridgeAdd(t, n, pod, "chc", "10.82.0.0/24")
	conf := withPrev(t, []byte(fmt.Sprintf(`{"cniVersion":"1.0.0","name":"qtest","type":"qoscni","stateDir":%q,
		"capabilities":{"io.kubernetes.cri.pod-annotations":true},
		"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"qoscni.io/egress-packet-rate":"100","qoscni.io/egress-packet-burst":"10"}}}`, n.StateDir)), prev)
	n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "chc", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained ADD")
	if out := n.Exec(t, "nft", "list", "set", "inet", "qoscni", "pkt-egress4"); !regexp.MustCompile(`10\.82\.0\.2 counter packets \d+ bytes \d+ limit rate over 100/second burst 10 packets`).MatchString(out) {
		t.Errorf("chained pod's packet rate: %s", out)
	}
	n.Invoke(t, testnet.Call{Command: "CHECK", ContainerID: "chc", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained CHECK")
	n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "chc", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "chained DEL")
	if out := n.Exec(t, "nft", "list", "set", "inet", "qoscni", "pkt-egress4"); strings.Contains(out, "elements") {
		t.Errorf("chained DEL left: %s", out)
	}
	if _, err := os.Stat(filepath.Join(n.StateDir, "qtest", "chc_eth0.json")); err == nil {
		t.Error("chained DEL left the record")
	}
	delMain()
}
