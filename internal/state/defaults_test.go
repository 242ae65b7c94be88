package state

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestDecodeOldShapingDefaults: a record written before the delay was kept
// typed carries the config's string; it decodes to the same value a new
// record holds, and is written back in the typed form only.
func TestDecodeOldShapingDefaults(t *testing.T) {
	old := `{"schema":1,"network":"n","containerID":"c","ifName":"eth0","hostVeth":"qv1","mode":"standalone",
		"shapingDefaults":{"ingressRate":40000000,"ingressBurst":100000,"maxQueueDelay":" 20ms ",
		"ceilings":{"maxQueueDelayNs":50000000}},"created":"2024-05-01T12:00:00Z"}`
	r, err := Decode([]byte(old))
	if err != nil {
		t.Fatal(err)
	}
	d := r.ShapingDefaults
	if d == nil || d.MaxQueueDelayNs != int64(20*time.Millisecond) || d.IngressRate != 40_000_000 || d.IngressBurst != 100_000 ||
		d.Ceilings == nil || d.Ceilings.MaxQueueDelayNs != int64(50*time.Millisecond) {
		t.Fatalf("old record's shaping defaults: %+v", d)
	}
	out, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if s := string(out); !strings.Contains(s, `"maxQueueDelayNs":20000000`) || strings.Contains(s, `"maxQueueDelay":`) {
		t.Errorf("re-encoded: %s", s)
	}
	again, err := Decode(out)
	if err != nil || *again.ShapingDefaults.Ceilings != *d.Ceilings || again.ShapingDefaults.MaxQueueDelayNs != d.MaxQueueDelayNs {
		t.Fatalf("round trip: %+v %v", again.ShapingDefaults, err)
	}
}

func TestDecodeShapingDefaultsDelay(t *testing.T) {
	for _, tc := range []struct {
		name, json string
		want       time.Duration
		bad        bool
	}{
		{"typed", `{"maxQueueDelayNs":5000000}`, 5 * time.Millisecond, false},
		{"none", `{"ingressRate":1}`, 0, false},
		{"empty string", `{"maxQueueDelay":""}`, 0, false},
		// Both: the typed one is what a newer plugin wrote.
		{"both", `{"maxQueueDelayNs":5000000,"maxQueueDelay":"1s"}`, 5 * time.Millisecond, false},
		{"unparsable", `{"maxQueueDelay":"soon"}`, 0, true},
		{"wrong type", `{"maxQueueDelay":5}`, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var d ShapingDefaults
			err := json.Unmarshal([]byte(tc.json), &d)
			if tc.bad {
				if err == nil {
					t.Fatalf("accepted: %+v", d)
				}
				return
			}
			if err != nil || time.Duration(d.MaxQueueDelayNs) != tc.want {
				t.Fatalf("got %v (%v), want %v", time.Duration(d.MaxQueueDelayNs), err, tc.want)
			}
		})
	}
}
