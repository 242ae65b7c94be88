package metrics

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
)

// grafanaVars stand in for the dashboard's variables so the PromQL parses.
var grafanaVars = strings.NewReplacer(
	"$__rate_interval", "1m", "$__interval", "1m", "$__range", "1h",
	"$namespace", "ns", "$pod", "pod", "$instance", "node:9742", "${datasource}", "ds",
)

// exprs walks any JSON value and collects "expr" strings of targets and
// "query" strings of variables (label_values(...) is Grafana, not PromQL: its
// inner selector is checked instead).
func exprs(v any, out *[]string) {
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			if s, ok := val.(string); ok && (k == "expr" || k == "definition") && s != "" {
				*out = append(*out, s)
			}
			exprs(val, out)
		}
	case []any:
		for _, e := range x {
			exprs(e, out)
		}
	}
}

func TestDashboardUsesExportedMetrics(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "deploy", "grafana", "qoscni.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	exported := map[string]bool{}
	for _, n := range NewCollector(Config{}).Names() {
		exported[n] = true
	}
	var all []string
	exprs(dash, &all)
	if len(all) < 10 {
		t.Fatalf("found only %d expressions", len(all))
	}
	promql := parser.NewParser(parser.Options{})
	used := map[string]bool{}
	for _, e := range all {
		q := grafanaVars.Replace(e)
		if strings.HasPrefix(q, "label_values(") {
			// label_values(<selector>, <label>): check the selector.
			inner := strings.TrimSuffix(strings.TrimPrefix(q, "label_values("), ")")
			q = inner[:strings.LastIndex(inner, ",")]
		}
		expr, err := promql.ParseExpr(q)
		if err != nil {
			t.Errorf("PromQL %q: %v", e, err)
			continue
		}
		parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
			if vs, ok := n.(*parser.VectorSelector); ok {
				if vs.Name == "" {
					t.Errorf("%q: selector without a metric name", e)
				} else if !exported[vs.Name] {
					t.Errorf("%q uses %s, which the agent does not export", e, vs.Name)
				}
				used[vs.Name] = true
			}
			return nil
		})
	}
	for _, want := range []string{"qoscni_shaping_sent_bytes_total", "qoscni_shaping_rate_limit_bytes_per_second",
		"qoscni_shaping_dropped_packets_total", "qoscni_shaping_overlimits_total", "qoscni_shaping_backlog_bytes",
		"qoscni_pod_hostports", "qoscni_ipam_addresses_used", "qoscni_cni_operation_duration_seconds_bucket",
		"qoscni_cni_operations_total", "qoscni_guarantee_sent_bytes_total", "qoscni_guarantee_request_bytes_per_second",
		"qoscni_guarantee_htb_borrows_total", "qoscni_guarantee_dropped_packets_total",
		"qoscni_guarantee_node_headroom_bytes_per_second", "qoscni_control_dropped_packets_total",
		"qoscni_control_refused_connections_total", "qoscni_control_up", "qoscni_control_dscp"} {
		if !used[want] {
			t.Errorf("dashboard does not chart %s", want)
		}
	}
}
