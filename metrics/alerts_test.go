package metrics

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/qoscni/qoscni/internal/testnet"
)

// The alert rules parse, use only metrics the agent exports, and their
// promtool unit tests pass.
func TestAlertRules(t *testing.T) {
	dir := filepath.Join("..", "deploy", "prometheus")
	data, err := os.ReadFile(filepath.Join(dir, "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var groups struct {
		Groups []struct {
			Rules []struct{ Alert, Expr string }
		}
	}
	if err := yaml.Unmarshal(data, &groups); err != nil {
		t.Fatalf("alerts.yml: %v", err)
	}
	exported := map[string]bool{}
	for _, n := range NewCollector(Config{}).Names() {
		exported[n] = true
	}
	rules := 0
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			rules++
			expr, err := parser.NewParser(parser.Options{}).ParseExpr(r.Expr)
			if err != nil {
				t.Errorf("%s: %v", r.Alert, err)
				continue
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				if vs, ok := n.(*parser.VectorSelector); ok && !exported[vs.Name] {
					t.Errorf("%s uses %q, which the agent does not export", r.Alert, vs.Name)
				}
				return nil
			})
		}
	}
	if rules == 0 {
		t.Fatal("no rules in alerts.yml")
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
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool test rules: %v\n%s", err, out)
	}
}
