package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/metrics"
)

type ruleGroups struct {
	Groups []struct {
		Name  string
		Rules []struct {
			Alert, Record, Expr, For string
			Labels, Annotations      map[string]string
		}
	}
}

// TestAlertRules: the rules parse; every series they select is one the
// agent exports (its collector and its reconciler), one they record, or
// Prometheus' own up; every alert has a severity, a summary and a
// description; the PrometheusRule in deploy/prometheusrule holds the same
// groups; and the promtool unit tests pass (they fail on a changed
// threshold, label or message).
func TestAlertRules(t *testing.T) {
	dir := filepath.Join("..", "..", "deploy", "prometheus")
	data, err := os.ReadFile(filepath.Join(dir, "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var groups ruleGroups
	if err := yaml.Unmarshal(data, &groups); err != nil {
		t.Fatalf("alerts.yml: %v", err)
	}
	known := map[string]bool{"up": true}
	for _, n := range append(metrics.NewCollector(metrics.Config{}).Names(), reconcile.MetricNames()...) {
		known[n] = true
	}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Record != "" {
				known[r.Record] = true
			}
		}
	}
	alerts := 0
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			name := r.Alert + r.Record
			expr, err := parser.NewParser(parser.Options{}).ParseExpr(r.Expr)
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				if vs, ok := n.(*parser.VectorSelector); ok && !known[vs.Name] {
					t.Errorf("%s uses %q, which neither the agent exports nor a rule records", name, vs.Name)
				}
				return nil
			})
			if r.Alert == "" {
				continue
			}
			alerts++
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" || r.For == "" {
				t.Errorf("%s: severity %q, for %q, summary or description missing", r.Alert, r.Labels["severity"], r.For)
			}
		}
	}
	if alerts < 7 {
		t.Fatalf("%d alerts in alerts.yml", alerts)
	}

	// The Operator's copy: same groups, in a PrometheusRule.
	op, err := os.ReadFile(filepath.Join("..", "..", "deploy", "prometheusrule", "prometheusrule.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rule struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string
		Spec       ruleGroups
	}
	if err := yaml.Unmarshal(op, &rule); err != nil {
		t.Fatal(err)
	}
	if rule.APIVersion != "monitoring.coreos.com/v1" || rule.Kind != "PrometheusRule" || !reflect.DeepEqual(rule.Spec, groups) {
		t.Errorf("deploy/prometheusrule (%s %s) does not hold alerts.yml's groups", rule.APIVersion, rule.Kind)
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv(testnet.RequireRootEnv) != "" {
			t.Fatal("promtool not found (apt-get install prometheus)")
		}
		t.Skip("promtool not found (apt-get install prometheus)")
	}
	cmd := exec.Command(promtool, "test", "rules", "alerts_test.yml")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "SUCCESS") {
		t.Errorf("promtool test rules: %v\n%s", err, out)
	}
}
