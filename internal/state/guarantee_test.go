package state

import (
	"encoding/json"
	"os"
	"reflect"
	"testing"
)

// TestGuaranteeRecord: a record with a guarantee decodes to what the
// plugin wrote, and writing it back loses nothing.
func TestGuaranteeRecord(t *testing.T) {
	data, err := os.ReadFile("testdata/record-guarantee.json")
	if err != nil {
		t.Fatal(err)
	}
	r, err := Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	want := &Guarantee{
		Minor: 258,
		Ingress: &GuaranteeDirection{RequestBits: 10_000_000, CeilBits: 100_000_000, Priority: "high", BurstBytes: 62_500, CburstBytes: 625_000,
			QueueBytes: 12_500, MaxQueueDelayNs: 10_000_000, Clamped: []Clamp{{Setting: "request", Requested: 50_000_000, Applied: 10_000_000}}},
		Egress: &GuaranteeDirection{CeilBits: 10_000_000_000, Priority: "normal", BurstBytes: 12_500_000, CburstBytes: 12_500_000,
			QueueBytes: 12_500_000, MaxQueueDelayNs: 10_000_000},
	}
	if r.Shaping == nil || !reflect.DeepEqual(r.Shaping.Guarantee, want) {
		t.Fatalf("guarantee %+v, want %+v", r.Shaping.Guarantee, want)
	}
	if r.Shaping.Ingress == nil || r.Shaping.Ingress.RateBits != 100_000_000 {
		t.Errorf("the limit beside the guarantee: %+v", r.Shaping.Ingress)
	}
	d := r.ShapingDefaults
	if d == nil || d.NodeCapacity == nil || *d.NodeCapacity != (NodeCapacity{IngressBits: 10_000_000_000, EgressBits: 10_000_000_000}) ||
		d.Ceilings == nil || d.Ceilings.MaxRequestBits != 10_000_000 {
		t.Fatalf("shaping defaults %+v", d)
	}

	s := New(t.TempDir())
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	again, err := s.Load(r.Key())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(again.Shaping, r.Shaping) || !reflect.DeepEqual(again.ShapingDefaults, r.ShapingDefaults) {
		t.Errorf("round trip:\n%+v\n%+v", again.Shaping, r.Shaping)
	}
}

// TestRecordWithoutGuarantee: records of plugins before guarantees decode
// without one, and are written back without the new keys.
func TestRecordWithoutGuarantee(t *testing.T) {
	old := `{"schema":1,"network":"n","containerID":"c","ifName":"eth0","hostVeth":"qv1","mode":"standalone",
		"shaping":{"ingress":{"device":"qv1","rateBits":1000000,"burstBits":100000,"limitBytes":12112,"maxQueueDelayNs":10000000,"source":"annotation"}},
		"shapingDefaults":{"ingressRate":40000000,"ingressBurst":100000,"ceilings":{"maxQueueDelayNs":50000000}},"created":"2024-05-01T12:00:00Z"}`
	r, err := Decode([]byte(old))
	if err != nil {
		t.Fatal(err)
	}
	if r.Shaping.Guarantee != nil || r.ShapingDefaults.NodeCapacity != nil || r.ShapingDefaults.Ceilings.MaxRequestBits != 0 {
		t.Fatalf("guarantee fields from an old record: %+v %+v", r.Shaping, r.ShapingDefaults)
	}
	out, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	sh := m["shaping"].(map[string]any)
	def := m["shapingDefaults"].(map[string]any)
	if _, ok := sh["guarantee"]; ok {
		t.Errorf("guarantee written for a record without one: %s", out)
	}
	if _, ok := def["nodeCapacity"]; ok {
		t.Errorf("nodeCapacity written for a record without one: %s", out)
	}
	if _, ok := def["ceilings"].(map[string]any)["maxRequestBits"]; ok {
		t.Errorf("maxRequestBits written for a record without one: %s", out)
	}
}
