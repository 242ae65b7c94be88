package shaping

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/state"
)

// TestGuaranteeRecordRoundTrip: what ResolveGuarantee gives survives the
// record (through JSON, as the agent reads it) unchanged, minor included.
func TestGuaranteeRecordRoundTrip(t *testing.T) {
	in := Inputs{Annotations: annotations(AnnotationIngressRate, "100M", AnnotationIngressRequest, "50M",
		AnnotationPriority, "low", AnnotationMaxQueueDelay, "1s"), Ceilings: Ceilings{MaxRequestBits: 20_000_000}}
	limits, err := Resolve(in, 1500)
	if err != nil {
		t.Fatal(err)
	}
	g, err := ResolveGuarantee(in, limits, Capacity{IngressBits: 1_000_000_000, EgressBits: 2_000_000_000}, 1500)
	if err != nil {
		t.Fatal(err)
	}
	// Clamps in both directions (delay and request; delay, queue and
	// buckets at 2G with 100 ms), so the round trip carries them.
	if len(g.Ingress.Clamps) != 2 || len(g.Egress.Clamps) != 4 {
		t.Fatalf("clamps %v, %v", g.Ingress.Clamps, g.Egress.Clamps)
	}
	rec := GuaranteeToRecord(g, 0xfffe)
	if rec.Ingress.Priority != "low" || rec.Egress.CeilBits != 2_000_000_000 || rec.Ingress.RequestBits != 20_000_000 {
		t.Errorf("record %+v %+v", rec.Ingress, rec.Egress)
	}
	data, err := json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	var decoded state.Guarantee
	if err := json.Unmarshal(data, &decoded); err != nil {
		t.Fatal(err)
	}
	back, minor := GuaranteeFromRecord(&decoded)
	if minor != 0xfffe || !reflect.DeepEqual(back, g) {
		t.Errorf("round trip:\n got %+v %+v minor %#x\nwant %+v %+v", back.Ingress, back.Egress, minor, g.Ingress, g.Egress)
	}

	// One direction only, and nothing at all.
	one := Guarantee{Egress: &Class{CeilBits: 1_000_000, Priority: PriorityHigh, BurstBytes: 3028, CburstBytes: 3028, QueueBytes: 12112, MaxQueueDelay: time.Millisecond}}
	if r := GuaranteeToRecord(one, 2); r.Ingress != nil || r.Egress.Priority != "high" {
		t.Errorf("egress only: %+v", r)
	} else if back, minor := GuaranteeFromRecord(r); minor != 2 || !reflect.DeepEqual(back, one) {
		t.Errorf("egress only round trip: %+v %d", back.Egress, minor)
	}
	if r := GuaranteeToRecord(Guarantee{}, 7); r != nil {
		t.Errorf("no classes recorded as %+v", r)
	}
	if g, minor := GuaranteeFromRecord(nil); !g.Empty() || minor != 0 {
		t.Errorf("nil record: %+v %d", g, minor)
	}
	// A priority no plugin writes reads as the default.
	if g, _ := GuaranteeFromRecord(&state.Guarantee{Ingress: &state.GuaranteeDirection{Priority: "urgent"}}); g.Ingress.Priority != PriorityNormal {
		t.Errorf("unknown priority read as %v", g.Ingress.Priority)
	}
}

func TestShapingDefaultsRecordRoundTrip(t *testing.T) {
	c := Ceilings{MaxQueueDelay: 20 * time.Millisecond, MaxRequestBits: 5_000_000}
	if got := CeilingsFromRecord(CeilingsToRecord(c)); got != c {
		t.Errorf("ceilings %+v, want %+v", got, c)
	}
	if r := CeilingsToRecord(Ceilings{MaxRequestBits: 1000}); r == nil || r.MaxRequestBits != 1000 {
		t.Errorf("maxRequest alone not recorded: %+v", r)
	}
	capacity := Capacity{IngressBits: 10_000_000_000}
	if r := CapacityToRecord(capacity); r == nil || r.IngressBits != 10_000_000_000 || r.EgressBits != 0 {
		t.Errorf("capacity record %+v", r)
	} else if back := CapacityFromRecord(r); back != capacity {
		t.Errorf("capacity round trip %+v", back)
	}
	if CapacityToRecord(Capacity{}) != nil || CapacityFromRecord(nil) != (Capacity{}) {
		t.Error("no capacity must stay out of the record")
	}
}
