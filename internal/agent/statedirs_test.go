package agent

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/journal"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// The reproduction end to end: a pod of a network whose stateDir
// is not the agent's --state-dir, its conflist in the CNI config dir, and
// the agent serving with a short reconcile interval. The pod keeps its
// devices through many passes, and the metrics and the status table show
// it, as they show the pods of the agent's own directory.
func TestAgentSeesEveryStateDir(t *testing.T) {
	node := testnet.NewNode(t)
	confDir := filepath.Join(node.Dir, "net.d")
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	otherState := filepath.Join(t.TempDir(), "state")
	plugin := map[string]any{
		"type": "qoscni", "bridge": "qbrm", "isGateway": true, "stateDir": otherState,
		"capabilities": map[string]any{"io.kubernetes.cri.pod-annotations": true},
		"ipam":         map[string]any{"ranges": []any{[]any{map[string]any{"subnet": "10.87.0.0/24"}}}, "dataDir": node.IPAMDir},
	}
	list, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "qmulti", "plugins": []any{plugin}})
	if err := os.WriteFile(filepath.Join(confDir, "20-qmulti.conflist"), list, 0o644); err != nil {
		t.Fatal(err)
	}
	conf := map[string]any{"cniVersion": "1.0.0", "name": "qmulti"}
	for k, v := range plugin {
		conf[k] = v
	}
	plain, _ := json.Marshal(conf)
	conf["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": map[string]string{
		"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "20M"}}
	withAnn, _ := json.Marshal(conf)
	pod := node.NewPod(t)
	node.Invoke(t, testnet.Call{Command: "ADD", ContainerID: "cmulti", Netns: pod.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=team-m;K8S_POD_NAME=multi;K8S_POD_UID=um", Config: withAnn}).MustSucceed(t, "ADD")
	t.Cleanup(func() {
		node.Invoke(t, testnet.Call{Command: "DEL", ContainerID: "cmulti", Netns: pod.Path, IfName: "eth0", Config: plain})
	})
	rec, err := state.New(otherState).Load(state.Key{Network: "qmulti", ContainerID: "cmulti", IfName: "eth0"})
	if err != nil || rec == nil || rec.Shaping == nil || rec.Shaping.IFB == "" {
		t.Fatalf("record: %+v %v", rec, err)
	}

	srv, err := New(Config{Listen: "127.0.0.1:0", StateDir: node.StateDir, JournalDir: journal.DirFor(node.StateDir),
		CNIConfDir: confDir, NetnsPath: node.Path, Version: "test", ReconcileInterval: 200 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	time.Sleep(2 * time.Second) // about ten passes; the defect took two

	for _, l := range []string{rec.HostVeth, rec.Shaping.IFB} {
		if _, err := node.Try("ip", "link", "show", l); err != nil {
			t.Errorf("the agent deleted %s", l)
		}
	}
	if _, err := pod.Try("ip", "link", "show", "eth0"); err != nil {
		t.Errorf("the pod lost its eth0")
	}
	s := scrapeAgent(t, srv.Addr())
	s.must(t, "qoscni_attachment_info", map[string]string{"container_id": "cmulti", "network": "qmulti"})
	in := map[string]string{"namespace": "team-m", "pod": "multi", "interface": "eth0", "direction": "ingress"}
	if v := s.must(t, "qoscni_shaping_rate_limit_bytes_per_second", in); v != 10_000_000/8 {
		t.Errorf("ingress limit = %v", v)
	}
	if v := s.must(t, "qoscni_shaping_qdisc_up", in); v != 1 {
		t.Errorf("qdisc_up = %v", v)
	}
	rows, err := Status(cniconf.StateSources{Own: node.StateDir, ConfDir: confDir}, node.Path, 100*time.Millisecond)
	if err != nil || len(rows) != 2 || rows[0].Pod != "multi" || !rows[0].QdiscFound || !rows[1].QdiscFound {
		t.Errorf("Status = %+v, %v", rows, err)
	}
}
