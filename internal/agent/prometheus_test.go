package agent

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/testnet"
)

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// A real Prometheus server, on loopback with a temporary config and TSDB,
// scrapes the agent; a PromQL query over its HTTP API returns the pod.
func TestPrometheusScrapesAgent(t *testing.T) {
	node := testnet.NewNode(t)
	prom := requireTool(t, "prometheus")
	pod := newShapedPod(t, node, 2, 10_000_000, 10_000_000)
	srv := startAgent(t, node, "")
	push(t, node, pod, 128<<10, true)

	dir := t.TempDir()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: qoscni-agent\n    static_configs:\n      - targets: ['%s']\n", srv.Addr())
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	cmd := exec.Command(prom, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), fmt.Sprintf("--web.listen-address=127.0.0.1:%d", port))
	logf, _ := os.Create(filepath.Join(dir, "prometheus.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // by PID: the process this test started
		_ = cmd.Wait()
		logf.Close()
	})

	q := fmt.Sprintf(`sum by (namespace, pod, direction) (rate(qoscni_shaping_sent_bytes_total{pod=%q}[10s])) * 8 >= 0`, pod.rec.Pod.Name)
	api := fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", port, url.QueryEscape(`qoscni_shaping_sent_bytes_total{pod="`+pod.rec.Pod.Name+`"}`))
	deadline := time.Now().Add(30 * time.Second)
	for {
		var res struct {
			Status string `json:"status"`
			Data   struct {
				Result []struct {
					Metric map[string]string `json:"metric"`
					Value  []any             `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		resp, err := http.Get(api)
		if err == nil {
			err = json.NewDecoder(resp.Body).Decode(&res)
			resp.Body.Close()
		}
		if err == nil && res.Status == "success" && len(res.Data.Result) == 2 {
			for _, r := range res.Data.Result {
				if r.Metric["namespace"] != "team-a" || r.Metric["job"] != "qoscni-agent" {
					t.Errorf("series labels %v", r.Metric)
				}
			}
			t.Logf("PromQL returned %d series for %s, e.g. %v", len(res.Data.Result), pod.rec.Pod.Name, res.Data.Result[0])
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
			t.Fatalf("no series from Prometheus after 30s (last err %v, result %+v)\n%s", err, res, log)
		}
		time.Sleep(500 * time.Millisecond)
	}
	// The dashboard's style of query evaluates too (rate needs two samples).
	rq := fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", port, url.QueryEscape(q))
	for end := time.Now().Add(15 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		resp, err := http.Get(rq)
		if err != nil {
			t.Fatal(err)
		}
		var res struct {
			Data struct {
				Result []any `json:"result"`
			} `json:"data"`
		}
		err = json.NewDecoder(resp.Body).Decode(&res)
		resp.Body.Close()
		if err == nil && len(res.Data.Result) == 2 {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("rate query returned %v (%v)", res, err)
		}
	}
}
