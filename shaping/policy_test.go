package shaping

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/state"
)

const containerdBurst = 4294967295

func TestPrecedence(t *testing.T) {
	in := Inputs{
		Annotations: map[string]string{AnnotationIngressRate: "10M"},
		Runtime:     &Rates{IngressRate: 20_000_000, IngressBurst: containerdBurst, EgressRate: 30_000_000, EgressBurst: containerdBurst},
		Config:      Rates{IngressRate: 40_000_000, IngressBurst: 100_000, EgressRate: 50_000_000, EgressBurst: 100_000},
	}
	p, err := Resolve(in, 1500)
	if err != nil {
		t.Fatal(err)
	}
	if p.Ingress.RateBits != 10_000_000 || p.Ingress.Source != SourceAnnotation {
		t.Errorf("ingress: %+v", p.Ingress)
	}
	if p.Egress.RateBits != 30_000_000 || p.Egress.Source != SourceRuntimeConfig {
		t.Errorf("egress: %+v", p.Egress)
	}
	in.Runtime = nil
	in.Annotations = nil
	p, _ = Resolve(in, 1500)
	if p.Ingress.RateBits != 40_000_000 || p.Ingress.Source != SourceConfig || p.Ingress.BurstBytes != 100_000/8 {
		t.Errorf("config ingress: %+v", p.Ingress)
	}
	if p, _ := Resolve(Inputs{}, 1500); !p.Empty() {
		t.Errorf("no input must shape nothing: %+v", p)
	}
	// A direction without input is not shaped even when the other is.
	p, _ = Resolve(Inputs{Annotations: map[string]string{AnnotationEgressRate: "1M"}}, 1500)
	if p.Ingress != nil || p.Egress == nil {
		t.Errorf("only egress: %+v", p)
	}
}

func TestRuntimeBurstCapAndFirstSecond(t *testing.T) {
	for _, rate := range []uint64{1_000_000, 10_000_000, 100_000_000, 1_000_000_000} {
		for _, burst := range []uint64{containerdBurst, 8 * containerdBurst} {
			p, err := Resolve(Inputs{Runtime: &Rates{IngressRate: rate, IngressBurst: burst}}, 1500)
			if err != nil {
				t.Fatal(err)
			}
			first := float64(rate+p.Ingress.BurstBytes*8) / float64(rate)
			if first > 1.25 {
				t.Errorf("rate %d burst %d: first second %.3fx", rate, burst, first)
			}
			// A saturated queue adds at most the budget (or the frame floor
			// at rates where the budget holds fewer frames).
			delay := time.Duration(float64(p.Ingress.LimitBytes*8) / float64(rate) * 1e9)
			if delay > DefaultMaxQueueDelay+time.Millisecond && p.Ingress.LimitBytes > minQueueFrames*1514 {
				t.Errorf("rate %d: queue limit %d B = %v", rate, p.Ingress.LimitBytes, delay)
			}
		}
	}
	// A modest runtime burst is honoured.
	p, _ := Resolve(Inputs{Runtime: &Rates{EgressRate: 100_000_000, EgressBurst: 800_000}}, 1500)
	if p.Egress.BurstBytes != 100_000 {
		t.Errorf("runtime burst not honoured: %+v", p.Egress)
	}
}

func TestExplicitBurstAndDelay(t *testing.T) {
	p, err := Resolve(Inputs{Annotations: map[string]string{
		AnnotationIngressRate: "100M", AnnotationIngressBurst: "8M", AnnotationMaxQueueDelay: "5ms",
	}}, 1500)
	if err != nil {
		t.Fatal(err)
	}
	if p.Ingress.BurstBytes != 1_000_000 || p.Ingress.MaxQueueDelay != 5*time.Millisecond {
		t.Errorf("%+v", p.Ingress)
	}
	// With a peak rate packets are cut to two frames, so the queue keeps
	// to the budget whatever the bucket.
	if p.Ingress.LimitBytes != 62_500 || !UsesPeak(p.Ingress.RateBytes(), p.Ingress.LimitBytes) {
		t.Errorf("limit %d, want the 5 ms budget at 100M, in peak mode", p.Ingress.LimitBytes)
	}
	// Without a peak rate the queue keeps to the budget: it is never
	// raised to a bucket the pod asked for.
	p, _ = Resolve(Inputs{Annotations: map[string]string{AnnotationIngressRate: "10G", AnnotationIngressBurst: "100M"}}, 1500)
	if p.Ingress.LimitBytes != 12_500_000 || p.Ingress.BurstBytes != 12_500_000 {
		t.Errorf("10G: limit %d, burst %d, want both 12.5 MB", p.Ingress.LimitBytes, p.Ingress.BurstBytes)
	}
	// Below one frame: clamped up so a full-size packet can pass.
	p, _ = Resolve(Inputs{Annotations: map[string]string{AnnotationIngressRate: "10M", AnnotationIngressBurst: "100"}}, 1500)
	if p.Ingress.BurstBytes != 1514 {
		t.Errorf("tiny burst: %d", p.Ingress.BurstBytes)
	}
	// Huge: clamped to the ceilings, never wrapped.
	p, _ = Resolve(Inputs{Annotations: map[string]string{AnnotationIngressRate: "1P", AnnotationIngressBurst: "1P"}}, 1500)
	if p.Ingress.BurstBytes != DefaultCeilingBurstBytes || p.Ingress.LimitBytes != DefaultCeilingQueueBytes || len(p.Ingress.Clamps) != 2 {
		t.Errorf("huge burst: %+v", p.Ingress)
	}
	p, _ = Resolve(Inputs{Config: Rates{EgressRate: 1_000_000, EgressBurst: 1_000_000}, ConfigMaxQueueDelay: 50 * time.Millisecond}, 9000)
	if p.Egress.MaxQueueDelay != 50*time.Millisecond || p.Egress.LimitBytes < 9014 {
		t.Errorf("config delay/jumbo: %+v", p.Egress)
	}
}

func TestKubernetesRange(t *testing.T) {
	ok := []string{"1k", "1000", "1Ki", "500k", "10M", "1.5M", "1G", "1P", "999999999999999999m"}
	for _, v := range ok {
		if _, err := Resolve(Inputs{Annotations: map[string]string{AnnotationIngressRate: v}}, 1500); err != nil {
			t.Errorf("%q rejected: %v", v, err)
		}
	}
	p, _ := Resolve(Inputs{Annotations: map[string]string{AnnotationIngressRate: "1.5M"}}, 1500)
	if p.Ingress.RateBits != 1_500_000 {
		t.Errorf("1.5M = %d", p.Ingress.RateBits)
	}
}

// Calico's names stand for qoscni's where a pod has only them; where it
// has both, qoscni's win; a bad Calico value is refused naming Calico's key.
func TestCalicoAliases(t *testing.T) {
	p, err := Resolve(Inputs{Annotations: map[string]string{CalicoIngressBandwidth: "10M", CalicoIngressBurst: "800k", CalicoEgressBandwidth: "2M"}}, 1500)
	if err != nil {
		t.Fatal(err)
	}
	if p.Ingress == nil || p.Ingress.RateBits != 10e6 || p.Ingress.Source != SourceAnnotation || p.Ingress.BurstBytes != 100e3 {
		t.Errorf("ingress from Calico's names: %+v", p.Ingress)
	}
	if p.Egress == nil || p.Egress.RateBits != 2e6 {
		t.Errorf("egress from Calico's name: %+v", p.Egress)
	}
	p, err = Resolve(Inputs{Annotations: map[string]string{AnnotationIngressRate: "20M", CalicoIngressBandwidth: "10M",
		AnnotationIngressBurst: "400k", CalicoIngressBurst: "800k"}}, 1500)
	if err != nil || p.Ingress.RateBits != 20e6 || p.Ingress.BurstBytes != 50e3 {
		t.Errorf("both names: qoscni's must win: %+v %v", p.Ingress, err)
	}
	// qoscni's value wins even where Calico's is bad: it is not read.
	if _, err := Resolve(Inputs{Annotations: map[string]string{AnnotationEgressRate: "1M", CalicoEgressBandwidth: "fast"}}, 1500); err != nil {
		t.Errorf("an unread Calico value failed the pod: %v", err)
	}
	for k, v := range map[string]string{CalicoEgressBandwidth: "999", CalicoIngressBurst: "-1"} {
		_, err := Resolve(Inputs{Annotations: map[string]string{k: v}}, 1500)
		if err == nil || !strings.Contains(err.Error(), "annotation "+k) {
			t.Errorf("%s=%s: %v, want an error naming it", k, v, err)
		}
	}
}

func TestBadInput(t *testing.T) {
	cases := []struct {
		name string
		in   Inputs
		want string
	}{
		{"unparsable", Inputs{Annotations: map[string]string{AnnotationIngressRate: "ten megabit"}}, AnnotationIngressRate},
		{"below 1k", Inputs{Annotations: map[string]string{AnnotationEgressRate: "999"}}, AnnotationEgressRate},
		{"above 1P", Inputs{Annotations: map[string]string{AnnotationEgressRate: "1.1P"}}, `"1.1P"`},
		{"negative rate", Inputs{Annotations: map[string]string{AnnotationEgressRate: "-10M"}}, "-10M"},
		{"negative burst", Inputs{Annotations: map[string]string{AnnotationIngressRate: "10M", AnnotationIngressBurst: "-1k"}}, AnnotationIngressBurst},
		{"bad delay", Inputs{Annotations: map[string]string{AnnotationIngressRate: "10M", AnnotationMaxQueueDelay: "soon"}}, AnnotationMaxQueueDelay},
		{"delay below the minimum", Inputs{Annotations: map[string]string{AnnotationMaxQueueDelay: "10us"}}, AnnotationMaxQueueDelay},
		{"config rate without burst", Inputs{Config: Rates{IngressRate: 1_000_000}}, "ingressBurst"},
		{"config rate too small", Inputs{Config: Rates{EgressRate: 10, EgressBurst: 10}}, "egressRate 10"},
		{"runtime rate too big", Inputs{Runtime: &Rates{IngressRate: 2 * MaxRateBits}}, "runtimeConfig.bandwidth.ingressRate"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Resolve(tc.in, 1500)
			var e *types.Error
			if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig {
				t.Fatalf("want CNI error 7, got %v", err)
			}
			if !strings.Contains(e.Msg, tc.want) {
				t.Errorf("message %q does not name %q", e.Msg, tc.want)
			}
		})
	}
}

func TestShapeMatching(t *testing.T) {
	for _, rate := range []uint64{1_000, 1_000_000, 1_000_000_000, 100_000_000_000, MaxRateBits} {
		p := derive(rate, 0, false, DefaultMaxQueueDelay, 1500, SourceConfig)
		w := wantShape(p, 1500)
		// What the kernel dumps: the same ticks (TBF recomputes them from
		// the burst in bytes, off by at most one).
		got := *w
		got.burstTicks++
		if w.kind == "htb" {
			// HTB's queue bound is its leaf's (here the FIFO fallback).
			got.leaf = leafQdisc{kind: "bfifo", handle: leafHandle, limitBytes: w.limitBytes}
		}
		if !w.matches(&got) {
			t.Errorf("rate %d: one tick of rounding must match", rate)
		}
		got.limitBytes++
		got.leaf.limitBytes++
		if w.matches(&got) {
			t.Errorf("rate %d: a different limit must not match", rate)
		}
		if (rate/8 > math.MaxUint32) != (w.kind == "htb") {
			t.Errorf("rate %d: kind %s", rate, w.kind)
		}
	}
	if wantShape(nil, 1500) != nil || (*shape)(nil).matches(wantShape(derive(1000, 0, false, DefaultMaxQueueDelay, 1500, ""), 1500)) {
		t.Error("nil handling")
	}
}

// TestCeilings: pod authors do not size kernel queues. The two
// reproductions of issue 14 (a 10 s budget at 1G made a 1.25 GB bucket and
// queue; a 4G burst at 200M a 500 MB bucket), then the operator's own
// ceilings.
func TestCeilings(t *testing.T) {
	anno := func(kv ...string) Inputs {
		m := map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return Inputs{Annotations: m}
	}
	clamped := func(p *Params, setting string) (Clamp, bool) {
		for _, c := range p.Clamps {
			if c.Setting == setting {
				return c, true
			}
		}
		return Clamp{}, false
	}

	p, err := Resolve(anno(AnnotationIngressRate, "1G", AnnotationMaxQueueDelay, "10s"), 1500)
	if err != nil {
		t.Fatal(err)
	}
	in := p.Ingress
	if in.MaxQueueDelay != DefaultCeilingQueueDelay || in.LimitBytes != 12_500_000 || in.BurstBytes > DefaultCeilingBurstBytes {
		t.Errorf("1G, 10s: %+v, want the 100 ms ceiling: 12.5 MB queue", in)
	}
	if c, ok := clamped(in, SettingQueueDelay); !ok || c.Requested != uint64(10*time.Second) || c.Applied != uint64(DefaultCeilingQueueDelay) {
		t.Errorf("1G, 10s: delay clamp not recorded: %+v", in.Clamps)
	}

	p, err = Resolve(anno(AnnotationIngressRate, "200M", AnnotationIngressBurst, "4G"), 1500)
	if err != nil {
		t.Fatal(err)
	}
	if p.Ingress.BurstBytes != DefaultCeilingBurstBytes {
		t.Errorf("200M, 4G burst: burst %d B, want the 16 MiB ceiling", p.Ingress.BurstBytes)
	}
	if c, ok := clamped(p.Ingress, SettingBurst); !ok || c.Requested != 500_000_000 {
		t.Errorf("burst clamp not recorded: %+v", p.Ingress.Clamps)
	}
	// The queue is the budget's, whatever the bucket.
	q, _ := Resolve(anno(AnnotationIngressRate, "200M"), 1500)
	if p.Ingress.LimitBytes != q.Ingress.LimitBytes {
		t.Errorf("200M: queue %d B with a 4G burst, %d B without", p.Ingress.LimitBytes, q.Ingress.LimitBytes)
	}

	// The operator's ceilings, for every direction and source.
	c := Ceilings{MaxQueueDelay: 20 * time.Millisecond, MaxBurstBytes: 256 << 10, MaxQueueBytes: 512 << 10}
	in2 := anno(AnnotationEgressRate, "10G", AnnotationEgressBurst, "10M", AnnotationMaxQueueDelay, "50ms")
	in2.Ceilings = c
	in2.Config = Rates{IngressRate: 1_000_000_000, IngressBurst: 8 << 30}
	p, err = Resolve(in2, 1500)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []*Params{p.Ingress, p.Egress} {
		if d.MaxQueueDelay != c.MaxQueueDelay || d.LimitBytes > c.MaxQueueBytes || d.BurstBytes > c.MaxBurstBytes {
			t.Errorf("%+v above %+v", d, c)
		}
	}
	// A value within the ceilings is untouched and unreported.
	p, _ = Resolve(anno(AnnotationIngressRate, "100M", AnnotationIngressBurst, "8M", AnnotationMaxQueueDelay, "5ms"), 1500)
	if len(p.Ingress.Clamps) != 0 {
		t.Errorf("clamps without a reason: %+v", p.Ingress.Clamps)
	}
}

// TestBurstWithinTicks: the kernel dumps the bucket in 32-bit ticks of 64
// ns, so a bucket longer than about 275 s of the rate would read back
// wrapped and never match; it is bounded there.
func TestBurstWithinTicks(t *testing.T) {
	p, err := Resolve(Inputs{Config: Rates{IngressRate: 1_000_000, IngressBurst: 4294967295}, Ceilings: Ceilings{MaxBurstBytes: math.MaxUint32}}, 1500)
	if err != nil {
		t.Fatal(err)
	}
	ticks := float64(p.Ingress.BurstBytes) * 1e9 / float64(p.Ingress.RateBytes()) / 64
	if ticks > math.MaxUint32 {
		t.Errorf("burst %d B at %d B/s is %.0f ticks, above 32 bits", p.Ingress.BurstBytes, p.Ingress.RateBytes(), ticks)
	}
}

// TestOutsizedQuantity: a pod's annotation must not keep the plugin busy.
// Before the check each of these took seconds (growing with the exponent)
// in resource.ParseQuantity or its comparisons.
func TestOutsizedQuantity(t *testing.T) {
	start := time.Now()
	for _, v := range []string{"8E88888888", "1e-99999999", "1e+100", "1E100", "1" + strings.Repeat("0", 80)} {
		for _, isRate := range []bool{true, false} {
			if _, err := parseQuantity("annotation x", v, isRate); err == nil || !strings.Contains(err.Error(), "annotation x") {
				t.Errorf("%.20q (rate %v): %v", v, isRate, err)
			}
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("refusing took %v", d)
	}
	// Exponents a rate can use, and the exa suffixes, still parse.
	for v, want := range map[string]uint64{"1e6": 1_000_000, "1E+06": 1_000_000, "0.001e18": 1_000_000_000_000_000, "1e99": 0, "1E": 1e18, "1Ei": 1 << 60, "10e-1": 1} {
		got, err := parseQuantity("x", v, false)
		if want == 0 {
			// Above what a burst can be: refused as too large, not as outsized.
			if err == nil || strings.Contains(err.Error(), "exponent") {
				t.Errorf("%q: %v", v, err)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("%q = %d (%v), want %d", v, got, err, want)
		}
	}
}

func TestPeakRate(t *testing.T) {
	p, err := Resolve(Inputs{Annotations: map[string]string{AnnotationEgressRate: "10M", AnnotationEgressPeakRate: "15M", AnnotationEgressMinBurst: "3k",
		CalicoIngressBandwidth: "1M", CalicoIngressPeakrate: "2M", CalicoIngressMinburst: "2000"}}, 1500)
	if err != nil {
		t.Fatal(err)
	}
	if p.Egress.PeakBits != 15e6 || p.Egress.MinBurstBytes != 3000 || p.Ingress.PeakBits != 2e6 || p.Ingress.MinBurstBytes != 2000 {
		t.Errorf("peaks: %+v %+v", p.Egress, p.Ingress)
	}
	// The record keeps them.
	back := FromRecord(&state.Record{Shaping: ToRecord(p, "qv", "qi")}, "qi").Plan
	if back.Egress.PeakBits != 15e6 || back.Ingress.MinBurstBytes != 2000 {
		t.Errorf("record round trip: %+v %+v", back.Egress, back.Ingress)
	}
	for _, c := range []struct {
		ann  map[string]string
		want string
	}{
		{map[string]string{AnnotationEgressPeakRate: "15M"}, "needs a rate"},
		{map[string]string{AnnotationEgressRate: "10M", AnnotationEgressPeakRate: "10M"}, "must be above the rate 10Mbit/s"},
		{map[string]string{AnnotationEgressRate: "10M", AnnotationEgressPeakRate: "40G"}, "TBF's peak rate"},
		{map[string]string{AnnotationEgressRate: "10M", AnnotationEgressMinBurst: "3k"}, "needs a peak rate"},
		{map[string]string{AnnotationEgressRate: "10M", AnnotationEgressPeakRate: "15M", CalicoEgressMinburst: "999"}, "annotation " + CalicoEgressMinburst},
		{map[string]string{AnnotationEgressRate: "10M", AnnotationEgressPeakRate: "15M", AnnotationEgressMinBurst: "101M"}, "between 1k and 100M bytes"},
		{map[string]string{CalicoIngressBandwidth: "1M", CalicoIngressPeakrate: "soon"}, "annotation " + CalicoIngressPeakrate},
	} {
		if _, err := Resolve(Inputs{Annotations: c.ann}, 1500); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want %q", c.ann, err, c.want)
		}
	}
	// In the node's hierarchy a direction has no token bucket of its own.
	g := Guarantee{Egress: &Class{RequestBits: 1e6}}
	if _, err := Split(p, g); err == nil || !strings.Contains(err.Error(), AnnotationEgressPeakRate) {
		t.Errorf("a peak in the hierarchy: %v", err)
	}
	p.Egress.PeakBits = 0
	if s, err := Split(p, g); err != nil || s.Egress != nil || s.Ingress == nil {
		t.Errorf("Split: %+v %v", s, err)
	}
}
