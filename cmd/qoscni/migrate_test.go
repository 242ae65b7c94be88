package main

import (
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/testnet"
)

// TestCalicoConfigKeys: a config migrated from Calico keeps keys qoscni
// does not read; they used to pass without a word. assign_ipv6 "false" is
// honoured (no IPv6 address although the ranges have an IPv6 set), ADD
// warns once, naming every key it ignores, and "policy": {"type": "k8s"}
// is read: the pod waits for the node agent to write its NetworkPolicy.
func TestCalicoConfigKeys(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	conf := netConf(n, "1.1.0", func(c map[string]any) {
		c["policy"] = map[string]any{"type": "k8s"}
		c["kubernetes"] = map[string]any{"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
		c["datastore_type"] = "kubernetes"
		ip := c["ipam"].(map[string]any)
		ip["assign_ipv4"] = "true"
		ip["assign_ipv6"] = "false"
	})
	r := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "calico", Netns: pod.Path, IfName: "eth0", Config: conf}).MustSucceed(t, "ADD")
	if addrs := podAddrs(t, pod); !strings.Contains(addrs, "10.77.0.") || strings.Contains(addrs, "fd77:") {
		t.Errorf("assign_ipv6 false: pod addresses %s", addrs)
	}
	warn := string(r.Stderr)
	if strings.Count(warn, "level=WARN") != 1 || !strings.Contains(warn, "datastore_type, kubernetes\"") {
		t.Errorf("want one warning naming the ignored keys, stderr:\n%s", warn)
	}
	if out := n.Exec(t, "nft", "list", "set", "inet", "qoscni", "np-pending4"); !strings.Contains(out, "10.77.0.") {
		t.Errorf("policy k8s: the pod's address is not pending:\n%s", out)
	}
	del(t, n, conf, "calico", pod.Path)
	assertClean(t, n)
}
