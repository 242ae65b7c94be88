package agent

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/sysctl"
	"github.com/qoscni/qoscni/internal/testnet"
)

func readyz(t *testing.T, srv *Server) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + srv.Addr() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// chainedConflist writes a conflist with qoscni behind another main plugin.
func chainedConflist(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "net.d")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data := `{"cniVersion":"1.0.0","name":"flannel","plugins":[{"type":"flannel"},{"type":"qoscni"}]}`
	if err := os.WriteFile(filepath.Join(dir, "10-flannel.conflist"), []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// /readyz fails while the node's br_netfilter sysctl is 0, with the
// message the plugin gives, and recovers when it is 1 again; behind
// another main plugin it is not qoscni's concern.
func TestReadyBridgeNetfilter(t *testing.T) {
	node := testnet.NewNode(t)
	if _, err := node.Try("test", "-e", "/proc/sys/"+podnet.BridgeNFCallIPTables); err != nil {
		t.Fatal("no net.bridge.bridge-nf-call-iptables in the node namespace: br_netfilter is not loaded on this machine (modprobe br_netfilter; make deps does)")
	}
	set := func(v string) { node.Exec(t, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables="+v) }
	srv := startAgent(t, node, writeConflist(t, node.Dir, node.IPAMDir))
	if code, body := readyz(t, srv); code != 200 {
		t.Fatalf("/readyz of a ready node: %d %s", code, body)
	}
	set("0")
	code, body := readyz(t, srv)
	if code != http.StatusServiceUnavailable {
		t.Errorf("/readyz with bridge-nf-call-iptables 0: %d %s", code, body)
	}
	for _, w := range []string{"br_netfilter", "net.bridge.bridge-nf-call-iptables", "is 0", "next ADD or STATUS", "sysctl -w"} {
		if !strings.Contains(body, w) {
			t.Errorf("/readyz does not say %q: %s", w, body)
		}
	}
	t.Logf("/readyz: %d %s", code, body)

	chained := startAgent(t, node, chainedConflist(t))
	if code, body := readyz(t, chained); code != 200 {
		t.Errorf("/readyz of a chained node: %d %s", code, body)
	}
	set("1")
	if code, body := readyz(t, srv); code != 200 {
		t.Errorf("/readyz once it is 1 again: %d %s", code, body)
	}
}

// Without the module (a /proc/sys without net/bridge), /readyz says what
// the plugin's STATUS says.
func TestReadyWithoutBridgeNetfilter(t *testing.T) {
	node := testnet.NewNode(t)
	procSys := t.TempDir()
	if err := os.MkdirAll(filepath.Join(procSys, "net", "ipv4"), 0o755); err != nil {
		t.Fatal(err)
	}
	srv := startAgentWith(t, node, Config{CNIConfDir: writeConflist(t, node.Dir, node.IPAMDir), ProcSys: sysctl.Tree(procSys)})
	code, body := readyz(t, srv)
	want := podnet.BridgeNetfilter{ProcSys: sysctl.Tree(procSys), NetnsFd: sysctl.Current}.Check()
	if code != http.StatusServiceUnavailable || want == nil || strings.TrimSpace(body) != want.Error() {
		t.Errorf("/readyz without br_netfilter: %d %q, want 503 %q", code, body, want)
	}
	for _, w := range []string{"not loaded", "modprobe br_netfilter"} {
		if !strings.Contains(body, w) {
			t.Errorf("/readyz does not say %q: %s", w, body)
		}
	}
	chained := startAgentWith(t, node, Config{CNIConfDir: chainedConflist(t), ProcSys: sysctl.Tree(procSys)})
	if code, body := readyz(t, chained); code != 200 {
		t.Errorf("/readyz of a chained node without br_netfilter: %d %s", code, body)
	}
}
