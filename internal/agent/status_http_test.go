package agent

import (
	"encoding/json"
	"io"
	"net/http"
	"testing"

	"github.com/qoscni/qoscni/internal/testnet"
)

// TestStatusEndpoint: /status serves the status rows of one pod, read
// from the kernel over the asked interval, as `kubectl qoscni explain`
// reads them through the API server; a bad interval is refused.
func TestStatusEndpoint(t *testing.T) {
	node := testnet.NewNode(t)
	pod := newShapedPod(t, node, 4, 10_000_000, 20_000_000)
	newShapedPod(t, node, 5, 1_000_000, 1_000_000)
	srv := startAgent(t, node, writeConflist(t, node.Dir, node.IPAMDir))
	get := func(query string) (int, []byte) {
		t.Helper()
		resp, err := http.Get("http://" + srv.Addr() + "/status" + query)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	code, body := get("?namespace=team-a&pod=" + pod.rec.Pod.Name + "&interval=200ms")
	var rows []StatusRow
	if err := json.Unmarshal(body, &rows); code != http.StatusOK || err != nil {
		t.Fatalf("status %d, %v: %s", code, err, body)
	}
	devices := map[string]string{}
	for _, r := range rows {
		if r.Pod != pod.rec.Pod.Name || !r.QdiscFound {
			t.Errorf("row %+v", r)
		}
		devices[r.Direction] = r.Device
	}
	if len(rows) != 2 || devices["ingress"] != pod.hostVeth || devices["egress"] != pod.ifb {
		t.Errorf("rows of %s: %+v", pod.rec.Pod.Name, rows)
	}
	if _, body := get("?interval=100ms"); !json.Valid(body) || len(body) < 10 {
		t.Errorf("all pods: %s", body)
	} else if err := json.Unmarshal(body, &rows); err != nil || len(rows) != 4 {
		t.Errorf("all pods: %d rows (%v), want 4 (two pods, two directions): %s", len(rows), err, body)
	}
	for _, q := range []string{"?interval=1h", "?interval=fast", "?interval=0s"} {
		if code, _ := get(q); code != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", q, code)
		}
	}
}
