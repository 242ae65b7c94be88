package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/cni/plugin"
	"github.com/qoscni/qoscni/internal/testnet"
)

// TestDelOfConfigAddRefused: a runtime repeats DEL until it succeeds, so a
// config ADD refused must not make every DEL fail. DEL succeeds, twice,
// changes nothing on a node ADD never touched, and removes everything of an
// attachment whose config went bad after its ADD.
func TestDelOfConfigAddRefused(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	badPorts := func(c map[string]any) {
		c["runtimeConfig"] = map[string]any{"portMappings": []any{map[string]any{"hostPort": 70000, "containerPort": 80}}}
	}
	badIPAM := func(c map[string]any) {
		c["ipam"] = map[string]any{"ranges": []any{[]any{map[string]any{"subnet": "10.0.0.0/33"}}}, "dataDir": n.IPAMDir}
	}
	refused := []struct {
		name string
		conf []byte
		env  []string
	}{
		{"bad hostPort", netConf(n, "1.1.0", badPorts), nil},
		{"hostPort twice", netConf(n, "1.1.0", func(c map[string]any) {
			c["runtimeConfig"] = map[string]any{"portMappings": []any{
				map[string]any{"hostPort": 8080, "containerPort": 80}, map[string]any{"hostPort": 8080, "containerPort": 81}}}
		}), nil},
		{"bad subnet", netConf(n, "1.1.0", badIPAM), nil},
		{"no ranges", netConf(n, "1.1.0", func(c map[string]any) { c["ipam"] = map[string]any{"type": "qoscni", "dataDir": n.IPAMDir} }), nil},
		{"mtu wrong type", netConf(n, "1.1.0", func(c map[string]any) { c["mtu"] = "big" }), nil},
		{"bridge too long", netConf(n, "1.1.0", func(c map[string]any) { c["bridge"] = "abcdefghijklmnopq" }), nil},
		{"ceiling too small", netConf(n, "1.1.0", func(c map[string]any) { c["ceilings"] = map[string]any{"maxQueueBytes": 1} }), nil},
		{"bad CNI_ARGS", netConf(n, "1.1.0", nil), []string{"CNI_ARGS=K8S_POD_NAME"}},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			call := testnet.Call{Command: "ADD", ContainerID: "refused", Netns: pod.Path, IfName: "eth0", Config: tc.conf, Env: tc.env}
			if r := n.Invoke(t, call); !r.Failed {
				t.Fatalf("ADD succeeded: %s", r.Stdout)
			}
			for i := 0; i < 2; i++ {
				call.Command = "DEL"
				n.Invoke(t, call).MustSucceed(t, "DEL of a refused config")
				call.Netns = "" // containerd's second DEL
			}
		})
	}
	if out := n.Exec(t, "ip", "-o", "link"); strings.Contains(out, "qbr0") || strings.Contains(out, "veth") {
		t.Errorf("DELs of refused configs changed the node: %s", out)
	}
	if _, err := os.Stat(filepath.Join(n.IPAMDir, "qtest")); err == nil {
		t.Error("DELs of refused configs created an IPAM store")
	}

	// An attachment ADDed with a good config, DELed with a bad one (the
	// runtime's copy of the config, or the conflist, went bad since).
	conf := netConf(n, "1.1.0", func(c map[string]any) {
		c["capabilities"] = map[string]any{"portMappings": true}
		c["runtimeConfig"] = map[string]any{"portMappings": []any{map[string]any{"hostPort": 18080, "containerPort": 80}}}
	})
	add(t, n, conf, "later", pod)
	worse := netConf(n, "1.1.0", func(c map[string]any) { badPorts(c); badIPAM(c) })
	n.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "later", Netns: pod.Path, IfName: "eth0", Config: worse}).MustSucceed(t, "DEL with a bad config")
	if out := n.Exec(t, "nft", "list", "map", "inet", "qoscni", "hostport4"); strings.Contains(out, "18080") {
		t.Errorf("hostPort left: %s", out)
	}
	assertClean(t, n)
}

// TestAddErrorCodes: an ADD of an attachment that exists answers qoscni's
// own code 100, not "invalid environment variables"; an exhausted address
// range answers 50, the code STATUS gives while the range is full, not 999.
func TestAddErrorCodes(t *testing.T) {
	t.Parallel()
	n := testnet.NewNode(t)
	conf := netConf(n, "1.1.0", func(c map[string]any) {
		c["ipam"] = map[string]any{"ranges": []any{[]any{map[string]any{"subnet": "10.79.0.0/30"}}}, "dataDir": n.IPAMDir}
	})
	pod, pod2 := n.NewPod(t), n.NewPod(t)
	add(t, n, conf, "c1", pod)
	again := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "c1", Netns: pod.Path, IfName: "eth0", Config: conf})
	if !again.Failed || again.Err.Code != plugin.ErrAttachmentExists || !strings.Contains(again.Err.Msg, "already exists") {
		t.Errorf("second ADD: want code %d, got %+v", plugin.ErrAttachmentExists, again.Err)
	}
	full := n.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "c2", Netns: pod2.Path, IfName: "eth0", Config: conf})
	if !full.Failed || full.Err.Code != types.ErrPluginNotAvailable || !strings.Contains(full.Err.Msg, "no free address") {
		t.Errorf("ADD into a full range: want code 50 naming it, got %+v", full.Err)
	}
	del(t, n, conf, "c2", pod2.Path)
	del(t, n, conf, "c1", pod.Path)
	assertClean(t, n)
}
