package reconcile

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/grant"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

func TestShapingAnnotationsEqual(t *testing.T) {
	base := map[string]string{shaping.AnnotationIngressRate: "10M", "app": "web"}
	cases := []struct {
		b    map[string]string
		want bool
	}{
		{map[string]string{shaping.AnnotationIngressRate: "10M", "app": "api"}, true}, // unrelated key
		{map[string]string{shaping.AnnotationIngressRate: "20M", "app": "web"}, false},
		{map[string]string{"app": "web"}, false},                                                                  // removed
		{map[string]string{shaping.AnnotationIngressRate: "10M", shaping.AnnotationEgressRate: "1M"}, false},      // added
		{map[string]string{shaping.AnnotationIngressRate: "10M", "qoscni.io/anything-new": ""}, false},            // any qoscni.io key
		{map[string]string{shaping.AnnotationIngressRate: "10M", "kubernetes.io/other": "x", "app": "web"}, true}, // not ours
		{map[string]string{shaping.AnnotationIngressRate: "10M", shaping.CalicoEgressBandwidth: "5M"}, false},     // Calico's alias
	}
	for i, c := range cases {
		if got := ShapingAnnotationsEqual(base, c.b); got != c.want {
			t.Errorf("case %d: got %v", i, got)
		}
		if got := ShapingAnnotationsEqual(c.b, base); got != c.want {
			t.Errorf("case %d reversed: got %v", i, got)
		}
	}
}

func TestSamePod(t *testing.T) {
	rec := &state.Record{Pod: state.Pod{Namespace: "ns", Name: "p", UID: "u1"}}
	for _, c := range []struct {
		pod  Pod
		want bool
	}{
		{Pod{Namespace: "ns", Name: "p", UID: "u1"}, true},
		{Pod{Namespace: "ns", Name: "p"}, true},
		{Pod{Namespace: "ns", Name: "p", UID: "u2"}, false}, // recreated under the same name
		{Pod{Namespace: "other", Name: "p", UID: "u1"}, false},
	} {
		if got := samePod(rec, c.pod); got != c.want {
			t.Errorf("%+v: got %v", c.pod, got)
		}
	}
	if samePod(&state.Record{}, Pod{}) {
		t.Error("a record without a pod identity matched")
	}
}

func TestNetnsGone(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "cni-dead")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if !netnsGone(plain) {
		t.Error("a plain file (unmounted netns) is not gone")
	}
	if !netnsGone(filepath.Join(dir, "cni-missing")) {
		t.Error("a missing file is not gone")
	}
	// No host mount: nothing can be told, so nothing is gone.
	if netnsGone(filepath.Join(dir, "not-mounted", "cni-x")) {
		t.Error("missing directory reported gone")
	}
	if netnsGone("/proc/self/ns/net") {
		t.Error("a live namespace reported gone")
	}
}

func TestResolveKeepsLegacyConfigShaping(t *testing.T) {
	rec := &state.Record{MTU: 1500, Shaping: &state.Shaping{Ingress: &state.Direction{RateBits: 1e6, Source: shaping.SourceConfig}}}
	if _, ok, err := resolve(rec, Pod{}); ok || err != nil {
		t.Errorf("record without ShapingDefaults re-resolved: ok=%v err=%v", ok, err)
	}
	rec.ShapingDefaults = &state.ShapingDefaults{IngressRate: 1e6, IngressBurst: 80000}
	plan, ok, err := resolve(rec, Pod{Annotations: map[string]string{shaping.AnnotationEgressRate: "5M"}})
	if !ok || err != nil || plan.Ingress == nil || plan.Ingress.Source != shaping.SourceConfig || plan.Egress == nil || plan.Egress.RateBits != 5e6 {
		t.Errorf("plan %+v ok=%v err=%v", plan, ok, err)
	}
}

// TestReshapeConfigDelay: the config's delay budget reaches a live
// reshape typed from the record, also from a record an older plugin wrote
// with the config's string.
func TestReshapeConfigDelay(t *testing.T) {
	pod := Pod{Annotations: map[string]string{shaping.AnnotationEgressRate: "100M"}}
	for _, defaults := range []string{`{"maxQueueDelayNs":30000000}`, `{"maxQueueDelay":"30ms"}`} {
		rec := &state.Record{MTU: 1500}
		if err := json.Unmarshal([]byte(defaults), &rec.ShapingDefaults); err != nil {
			t.Fatal(err)
		}
		plan, ok, err := resolve(rec, pod)
		if err != nil || !ok || plan.Egress == nil || plan.Egress.MaxQueueDelay != 30*time.Millisecond {
			t.Errorf("%s: plan %+v ok=%v err=%v", defaults, plan.Egress, ok, err)
		}
	}
}

// TestReshapeKeepsCeilings: a live annotation change is bounded by the
// ceilings the attachment's config had at ADD (kept in the record), or by
// the defaults when it had none.
func TestReshapeKeepsCeilings(t *testing.T) {
	pod := Pod{Annotations: map[string]string{shaping.AnnotationIngressRate: "1G", shaping.AnnotationMaxQueueDelay: "10s",
		shaping.AnnotationIngressBurst: "4G"}}
	rec := &state.Record{MTU: 1500}
	plan, ok, err := resolve(rec, pod)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	if plan.Ingress.MaxQueueDelay != shaping.DefaultCeilingQueueDelay || plan.Ingress.BurstBytes != shaping.DefaultCeilingBurstBytes {
		t.Errorf("default ceilings not applied: %+v", plan.Ingress)
	}
	rec.ShapingDefaults = &state.ShapingDefaults{Ceilings: &state.Ceilings{MaxQueueDelayNs: int64(20 * time.Millisecond), MaxBurstBits: 1 << 23, MaxQueueBytes: 1 << 20}}
	plan, _, err = resolve(rec, pod)
	if err != nil {
		t.Fatal(err)
	}
	if in := plan.Ingress; in.MaxQueueDelay != 20*time.Millisecond || in.BurstBytes != 1<<20 || in.LimitBytes > 1<<20 || len(in.Clamps) != 3 {
		t.Errorf("the record's ceilings not applied: %+v", in)
	}
}

// TestReshapeTakesDRAGrant: the agent resolves a pod's guarantee as ADD
// did, its DRA grant beside the registry winning over its annotation, so a
// pass does not reshape a placed pod back to what the annotation says.
func TestReshapeTakesDRAGrant(t *testing.T) {
	reg := filepath.Join(t.TempDir(), "statedirs")
	events := &eventLog{}
	r := &Reconciler{cfg: Config{StateRegistry: reg, Events: events}, log: slog.New(slog.DiscardHandler), overridden: map[podRef]string{}}
	pod := Pod{Namespace: "ns", Name: "web", UID: "5f2a9c1e-0d3b-4e7a-8c6f-1b2d3e4f5a6b",
		Annotations: map[string]string{shaping.AnnotationEgressRequest: "100M"}}
	rec := &state.Record{MTU: 1500, ShapingDefaults: &state.ShapingDefaults{NodeCapacity: &state.NodeCapacity{EgressBits: 1_000_000_000}}}
	if g, err := r.granted(pod); err != nil || g != nil {
		t.Fatalf("no grant yet: %+v %v", g, err)
	}
	if err := grant.Write(paths.GrantDirOf(reg), pod.UID, "c1", grant.Grant{Claim: "ns/web-bw", EgressBits: 400_000_000}); err != nil {
		t.Fatal(err)
	}
	granted, err := r.granted(pod)
	if err != nil || granted == nil || granted.EgressBits != 400_000_000 {
		t.Fatalf("grant %+v, %v", granted, err)
	}
	_, g, ok, err := resolveAll(rec, pod, granted)
	if err != nil || !ok || g.Egress == nil || g.Egress.RequestBits != 400_000_000 {
		t.Fatalf("guarantee %+v, %v %v", g.Egress, ok, err)
	}
	if _, g, _, _ = resolveAll(rec, pod, nil); g.Egress.RequestBits != 100_000_000 {
		t.Fatalf("without the grant: %+v", g.Egress)
	}
	// The claim replaced the egress annotation: one Event, not one per
	// pass; none once the annotation is gone.
	if _, err := r.granted(pod); err != nil {
		t.Fatal(err)
	}
	want := `the pod's bandwidth claims (ns/web-bw) set its guaranteed request: egress 400Mbit/s instead of qoscni.io/egress-bandwidth-request="100M"`
	if len(events.got) != 1 || events.got[0] != ReasonClaimOverridesRequest+": "+want {
		t.Fatalf("events %q", events.got)
	}
	delete(pod.Annotations, shaping.AnnotationEgressRequest)
	if _, err := r.granted(pod); err != nil || len(events.got) != 1 || len(r.overridden) != 0 {
		t.Fatalf("without the annotation: events %q, remembered %v, %v", events.got, r.overridden, err)
	}
}

// eventLog is an EventSink that keeps "reason: message".
type eventLog struct{ got []string }

func (e *eventLog) Warn(_ Pod, reason, message string) { e.got = append(e.got, reason+": "+message) }

func (e *eventLog) Normal(_ Pod, reason, message string) {
	e.got = append(e.got, "normal "+reason+": "+message)
}

// fakePods is a PodSource of UIDs only.
type fakePods map[string]bool

func (fakePods) Synced() bool                { return true }
func (fakePods) Pod(_, _ string) (Pod, bool) { return Pod{}, false }
func (f fakePods) UIDs() map[string]bool     { return f }

// TestGrantGC: the DRA grants of a pod the node no longer has go after
// GrantGCGrace of it being missing; a present pod's stay, and a pod seen
// again restarts the grace.
func TestGrantGC(t *testing.T) {
	reg := filepath.Join(t.TempDir(), "statedirs")
	dir := paths.GrantDirOf(reg)
	const here, gone = "1a2b3c4d-0000-4000-8000-000000000001", "1a2b3c4d-0000-4000-8000-000000000002"
	for _, uid := range []string{here, gone} {
		if err := grant.Write(dir, uid, "c1", grant.Grant{EgressBits: 1e6}); err != nil {
			t.Fatal(err)
		}
	}
	clock := time.Unix(1_800_000_000, 0)
	pods := fakePods{here: true}
	r := &Reconciler{cfg: Config{StateRegistry: reg, Pods: pods}, log: slog.New(slog.DiscardHandler),
		grantGone: map[string]time.Time{}, now: func() time.Time { return clock }}
	left := func() []string {
		t.Helper()
		p, err := grant.Pods(dir)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	var res PassResult
	r.gcGrants(&res)
	clock = clock.Add(GrantGCGrace - time.Second)
	r.gcGrants(&res)
	if l := left(); len(l) != 2 || res.GCed != 0 {
		t.Fatalf("within the grace: %v, %+v", l, res)
	}
	// Back in the informer (late), then missing again: the grace restarts.
	pods[gone] = true
	r.gcGrants(&res)
	delete(pods, gone)
	r.gcGrants(&res)
	clock = clock.Add(GrantGCGrace - time.Second)
	r.gcGrants(&res)
	if l := left(); len(l) != 2 {
		t.Fatalf("the grace did not restart: %v", l)
	}
	clock = clock.Add(2 * time.Second)
	r.gcGrants(&res)
	if l := left(); len(l) != 1 || l[0] != here || res.GCed != 1 {
		t.Fatalf("after the grace: %v, %+v", l, res)
	}
}
