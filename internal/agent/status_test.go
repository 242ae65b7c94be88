package agent

import (
	"encoding/json"
	"strings"
	"testing"
)

// A pod in the node hierarchy shows its request, limit and priority; the
// node lines its capacity, reservations and headroom; JSON stays one array.
func TestWriteStatusGuarantees(t *testing.T) {
	neg := int64(-5_000_000)
	rows := []StatusRow{
		{Scope: ScopePod, Namespace: "a", Pod: "web", Interface: "eth0", Direction: "egress", Device: "qoscni.out", Class: "1:10",
			RequestBits: 10_000_000, LimitBits: 20_000_000, Priority: "high", QdiscFound: true, RateBits: 15_000_000},
		{Scope: ScopePod, Namespace: "a", Pod: "be", Interface: "eth0", Direction: "ingress", Device: "qoscni.in", Class: "1:11",
			LimitBits: 40_000_000, Priority: "low"},
		{Scope: ScopeNode, Direction: "ingress", Device: "qoscni.in", CapacityBits: 40_000_000, ReservedBits: 45_000_000, HeadroomBits: &neg, QdiscFound: true},
	}
	var b strings.Builder
	if err := WriteStatus(&b, rows, false); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	t.Logf("\n%s", out)
	lines := strings.Split(out, "\n")
	want := map[string][]string{
		"a/web":     {"10.00Mbit", "20.00Mbit", "high", "15.00Mbit", "75%"},
		"a/be":      {"0bit", "40.00Mbit", "low", "no class"},
		"qoscni.in": {"ingress", "40.00Mbit", "45.00Mbit", "-5.00Mbit"},
	}
	for prefix, fields := range want {
		found := false
		for _, l := range lines {
			if strings.HasPrefix(l, prefix+" ") {
				found = true
				for _, f := range fields {
					if !strings.Contains(l, f) {
						t.Errorf("line %q lacks %q", l, f)
					}
				}
			}
		}
		if !found {
			t.Errorf("no line for %s", prefix)
		}
	}
	b.Reset()
	if err := WriteStatus(&b, rows, true); err != nil {
		t.Fatal(err)
	}
	var back []map[string]any
	if err := json.Unmarshal([]byte(b.String()), &back); err != nil || len(back) != 3 {
		t.Fatalf("JSON %v: %s", err, b.String())
	}
	if back[0]["requestBitsPerSecond"] != 1e7 || back[0]["priority"] != "high" || back[2]["scope"] != "node" || back[2]["headroomBitsPerSecond"] != -5e6 {
		t.Errorf("JSON rows %v", back)
	}
}
