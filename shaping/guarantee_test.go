package shaping

import (
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

func annotations(kv ...string) map[string]string {
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

// resolveBoth runs the plugin's order: the limits, then the guarantee.
func resolveBoth(t *testing.T, in Inputs, capacity Capacity) (Guarantee, error) {
	t.Helper()
	limits, err := Resolve(in, 1500)
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	return ResolveGuarantee(in, limits, capacity, 1500)
}

func TestResolveGuarantee(t *testing.T) {
	const (
		g10 = 10_000_000_000
		g1  = 1_000_000_000
	)
	both := Capacity{IngressBits: g1, EgressBits: g1}
	// Sizes at 1500 MTU and the 10 ms budget: at 10M the queue is the
	// budget (12500 B) and the bucket 50 ms (62500 B, peak mode); at 100M
	// the bucket is 625000 B; at 1G (no peak) bucket and queue are the
	// budget, 1.25 MB.
	cases := []struct {
		name     string
		in       Inputs
		capacity Capacity
		ingress  *Class // nil: no class
		egress   *Class
	}{
		{"no capacity: request ignored, even a bad one",
			Inputs{Annotations: annotations(AnnotationIngressRequest, "lots", AnnotationPriority, "urgent")}, Capacity{}, nil, nil},
		{"egress off: its request ignored",
			Inputs{Annotations: annotations(AnnotationIngressRequest, "10M", AnnotationEgressRequest, "lots")}, Capacity{IngressBits: g1},
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_250_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay}, nil},
		{"best effort without limit borrows the capacity",
			Inputs{}, both,
			&Class{CeilBits: g1, Priority: PriorityNormal, BurstBytes: 1_250_000, CburstBytes: 1_250_000, QueueBytes: 1_250_000, MaxQueueDelay: DefaultMaxQueueDelay},
			&Class{CeilBits: g1, Priority: PriorityNormal, BurstBytes: 1_250_000, CburstBytes: 1_250_000, QueueBytes: 1_250_000, MaxQueueDelay: DefaultMaxQueueDelay}},
		{"request and limit",
			Inputs{Annotations: annotations(AnnotationIngressRate, "100M", AnnotationIngressRequest, "10M")}, both,
			&Class{RequestBits: 10_000_000, CeilBits: 100_000_000, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 625_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay},
			&Class{CeilBits: g1, Priority: PriorityNormal, BurstBytes: 1_250_000, CburstBytes: 1_250_000, QueueBytes: 1_250_000, MaxQueueDelay: DefaultMaxQueueDelay}},
		{"best effort with a limit is sized at the limit",
			Inputs{Annotations: annotations(AnnotationEgressRate, "100M", AnnotationPriority, "low")}, Capacity{EgressBits: g1},
			nil, &Class{CeilBits: 100_000_000, Priority: PriorityLow, BurstBytes: 625_000, CburstBytes: 625_000, QueueBytes: 125_000, MaxQueueDelay: DefaultMaxQueueDelay}},
		{"limit above capacity is cut to it",
			Inputs{Annotations: annotations(AnnotationIngressRate, "20G", AnnotationIngressRequest, "10M")}, Capacity{IngressBits: g1},
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_250_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay}, nil},
		{"request above capacity is admission's business",
			Inputs{Annotations: annotations(AnnotationIngressRequest, "10G")}, Capacity{IngressBits: g1},
			&Class{RequestBits: g10, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 12_500_000, CburstBytes: 1_250_000, QueueBytes: 12_500_000, MaxQueueDelay: DefaultMaxQueueDelay}, nil},
		{"priority in any case, spaces trimmed",
			Inputs{Annotations: annotations(AnnotationPriority, " HIGH ")}, Capacity{EgressBits: g1},
			nil, &Class{CeilBits: g1, Priority: PriorityHigh, BurstBytes: 1_250_000, CburstBytes: 1_250_000, QueueBytes: 1_250_000, MaxQueueDelay: DefaultMaxQueueDelay}},
		{"request above the operator's ceiling is clamped",
			Inputs{Annotations: annotations(AnnotationIngressRequest, "50M"), Ceilings: Ceilings{MaxRequestBits: 10_000_000}}, Capacity{IngressBits: g1},
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_250_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay,
				Clamps: []Clamp{{SettingRequest, 50_000_000, 10_000_000}}}, nil},
		{"a DRA grant is the request; that direction's annotation is not read",
			Inputs{Annotations: annotations(AnnotationIngressRequest, "10M", AnnotationEgressRequest, "lots"), Granted: &Granted{EgressBits: 10_000_000}}, both,
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_250_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay},
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_250_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay, Claimed: true}},
		{"a DRA grant above the pod's limit raises its ceiling to the grant",
			Inputs{Annotations: annotations(AnnotationEgressRate, "5M"), Granted: &Granted{EgressBits: 10_000_000}}, Capacity{EgressBits: g1},
			nil, &Class{RequestBits: 10_000_000, CeilBits: 10_000_000, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 62_500, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay, Claimed: true}},
		{"a DRA grant is clamped by the operator's ceiling like a request",
			Inputs{Granted: &Granted{IngressBits: 50_000_000}, Ceilings: Ceilings{MaxRequestBits: 10_000_000}}, Capacity{IngressBits: g1},
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_250_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay,
				Clamps: []Clamp{{SettingRequest, 50_000_000, 10_000_000}}, Claimed: true}, nil},
		{"request at the operator's ceiling is untouched",
			Inputs{Annotations: annotations(AnnotationIngressRequest, "10M"), Ceilings: Ceilings{MaxRequestBits: 10_000_000}}, Capacity{IngressBits: g1},
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_250_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay}, nil},
		{"burst annotation sizes the borrowing bucket only",
			Inputs{Annotations: annotations(AnnotationIngressRate, "100M", AnnotationIngressBurst, "8M", AnnotationIngressRequest, "10M")}, Capacity{IngressBits: g1},
			&Class{RequestBits: 10_000_000, CeilBits: 100_000_000, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 1_000_000, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay}, nil},
		{"burst annotation without a limit",
			Inputs{Annotations: annotations(AnnotationEgressBurst, "8M")}, Capacity{EgressBits: g1},
			nil, &Class{CeilBits: g1, Priority: PriorityNormal, BurstBytes: 1_250_000, CburstBytes: 1_000_000, QueueBytes: 1_250_000, MaxQueueDelay: DefaultMaxQueueDelay}},
		{"runtime limit brings its burst",
			Inputs{Runtime: &Rates{EgressRate: 100_000_000, EgressBurst: 800_000}}, Capacity{EgressBits: g1},
			nil, &Class{CeilBits: 100_000_000, Priority: PriorityNormal, BurstBytes: 625_000, CburstBytes: 100_000, QueueBytes: 125_000, MaxQueueDelay: DefaultMaxQueueDelay}},
		{"delay: clamped once, recorded in each direction",
			Inputs{Annotations: annotations(AnnotationMaxQueueDelay, "10s", AnnotationIngressRequest, "10M")}, both,
			&Class{RequestBits: 10_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: 12_500_000, QueueBytes: 125_000, MaxQueueDelay: 100 * time.Millisecond,
				Clamps: []Clamp{{SettingQueueDelay, uint64(10 * time.Second), uint64(100 * time.Millisecond)}}},
			&Class{CeilBits: g1, Priority: PriorityNormal, BurstBytes: 12_500_000, CburstBytes: 12_500_000, QueueBytes: 12_500_000, MaxQueueDelay: 100 * time.Millisecond,
				Clamps: []Clamp{{SettingQueueDelay, uint64(10 * time.Second), uint64(100 * time.Millisecond)}}}},
		{"config delay",
			Inputs{ConfigMaxQueueDelay: 5 * time.Millisecond, Annotations: annotations(AnnotationIngressRequest, "100M")}, Capacity{IngressBits: g1},
			&Class{RequestBits: 100_000_000, CeilBits: g1, Priority: PriorityNormal, BurstBytes: 625_000, CburstBytes: 625_000, QueueBytes: 62_500, MaxQueueDelay: 5 * time.Millisecond}, nil},
		{"a big borrowing burst is clamped as cburst",
			Inputs{Annotations: annotations(AnnotationIngressRate, "200M", AnnotationIngressBurst, "4G", AnnotationIngressRequest, "10M")}, Capacity{IngressBits: g1},
			&Class{RequestBits: 10_000_000, CeilBits: 200_000_000, Priority: PriorityNormal, BurstBytes: 62_500, CburstBytes: DefaultCeilingBurstBytes, QueueBytes: 12_500, MaxQueueDelay: DefaultMaxQueueDelay,
				Clamps: []Clamp{{SettingCburst, 500_000_000, DefaultCeilingBurstBytes}}}, nil},
		{"a big request's queue is clamped",
			Inputs{Annotations: annotations(AnnotationIngressRequest, "10G"), Ceilings: Ceilings{MaxQueueBytes: 1 << 20}}, Capacity{IngressBits: g10},
			&Class{RequestBits: g10, CeilBits: g10, Priority: PriorityNormal, BurstBytes: 12_500_000, CburstBytes: 12_500_000, QueueBytes: 1 << 20, MaxQueueDelay: DefaultMaxQueueDelay,
				Clamps: []Clamp{{SettingQueueLimit, 12_500_000, 1 << 20}}}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g, err := resolveBoth(t, tc.in, tc.capacity)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(g.Ingress, tc.ingress) {
				t.Errorf("ingress\n got %+v\nwant %+v", g.Ingress, tc.ingress)
			}
			if !reflect.DeepEqual(g.Egress, tc.egress) {
				t.Errorf("egress\n got %+v\nwant %+v", g.Egress, tc.egress)
			}
			if g.Empty() != (tc.ingress == nil && tc.egress == nil) {
				t.Errorf("Empty() = %v", g.Empty())
			}
		})
	}
}

// TestGuaranteeSizedAsLimits: a class is sized by the policy of a limit,
// not by a second one: its guaranteed part as a pod limited to the
// request, its borrowing bucket as the pod's own limit.
func TestGuaranteeSizedAsLimits(t *testing.T) {
	for _, mtu := range []int{1500, 9000} {
		for _, req := range []string{"1k", "300k", "10M", "250M", "3G", "40G"} {
			for _, lim := range []string{"100M", "1G", "50G"} {
				in := Inputs{Annotations: annotations(AnnotationEgressRequest, req, AnnotationEgressRate, lim, AnnotationMaxQueueDelay, "3ms")}
				limits, err := Resolve(in, mtu)
				if err != nil {
					t.Fatal(err)
				}
				g, err := ResolveGuarantee(in, limits, Capacity{EgressBits: 100_000_000_000}, mtu)
				if err != nil {
					if e := (*types.Error)(nil); errors.As(err, &e) && strings.Contains(e.Msg, "exceeds limit") {
						continue
					}
					t.Fatal(err)
				}
				asLimit, _ := Resolve(Inputs{Annotations: annotations(AnnotationEgressRate, req, AnnotationMaxQueueDelay, "3ms")}, mtu)
				c := g.Egress
				if c.BurstBytes != asLimit.Egress.BurstBytes || c.QueueBytes != asLimit.Egress.LimitBytes {
					t.Errorf("mtu %d request %s: burst %d queue %d, a limit of %s has %d and %d",
						mtu, req, c.BurstBytes, c.QueueBytes, req, asLimit.Egress.BurstBytes, asLimit.Egress.LimitBytes)
				}
				if c.CeilBits != limits.Egress.RateBits || c.CburstBytes != limits.Egress.BurstBytes {
					t.Errorf("mtu %d limit %s: ceil %d cburst %d, the limit has %d and %d",
						mtu, lim, c.CeilBits, c.CburstBytes, limits.Egress.RateBits, limits.Egress.BurstBytes)
				}
				if c.CburstBytes > MaxBurstBytesAt(c.CeilBits/8) || c.BurstBytes > MaxBurstBytesAt(c.RequestBits/8) {
					t.Errorf("mtu %d %s/%s: a bucket the kernel cannot report: %+v", mtu, req, lim, c)
				}
			}
		}
	}
}

func TestResolveGuaranteeErrors(t *testing.T) {
	capacity := Capacity{IngressBits: 1_000_000_000, EgressBits: 1_000_000_000}
	cases := []struct {
		name string
		in   Inputs
		want []string
	}{
		{"unparsable", Inputs{Annotations: annotations(AnnotationIngressRequest, "ten megabit")},
			[]string{"annotation " + AnnotationIngressRequest, `"ten megabit"`}},
		{"below 1k", Inputs{Annotations: annotations(AnnotationEgressRequest, "999")},
			[]string{"annotation " + AnnotationEgressRequest, `"999"`, "1k"}},
		{"zero", Inputs{Annotations: annotations(AnnotationEgressRequest, "0")},
			[]string{"annotation " + AnnotationEgressRequest, `"0"`}},
		{"negative", Inputs{Annotations: annotations(AnnotationIngressRequest, "-10M")},
			[]string{"annotation " + AnnotationIngressRequest, "negative"}},
		{"above the annotation limit", Inputs{Annotations: annotations(AnnotationIngressRate, "20M", AnnotationIngressRequest, "30M")},
			[]string{"annotation " + AnnotationIngressRequest, "request 30Mbit/s exceeds limit 20Mbit/s (kubernetes.io/ingress-bandwidth)"}},
		{"above the limit and the operator's ceiling",
			Inputs{Annotations: annotations(AnnotationIngressRate, "20M", AnnotationIngressRequest, "30M"), Ceilings: Ceilings{MaxRequestBits: 10_000_000}},
			[]string{"request 30Mbit/s exceeds limit 20Mbit/s"}},
		{"above the runtime limit", Inputs{Runtime: &Rates{EgressRate: 1_500_000}, Annotations: annotations(AnnotationEgressRequest, "2M")},
			[]string{"request 2Mbit/s exceeds limit 1.5Mbit/s (runtimeConfig.bandwidth.egressRate)"}},
		{"above the config limit", Inputs{Config: Rates{IngressRate: 1_000_000, IngressBurst: 10_000}, Annotations: annotations(AnnotationIngressRequest, "1.001M")},
			[]string{"request 1.001Mbit/s exceeds limit 1Mbit/s (ingressRate)"}},
		{"bad priority", Inputs{Annotations: annotations(AnnotationPriority, "urgent")},
			[]string{"annotation " + AnnotationPriority, `"urgent"`, "high, normal or low"}},
		{"bad delay", Inputs{Annotations: annotations(AnnotationMaxQueueDelay, "soon")},
			[]string{"annotation " + AnnotationMaxQueueDelay}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// The limits come from Resolve only where it accepts the inputs
			// (a bad delay it refuses itself, first, in the plugin).
			limits, _ := Resolve(tc.in, 1500)
			g, err := ResolveGuarantee(tc.in, limits, capacity, 1500)
			var e *types.Error
			if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig {
				t.Fatalf("want CNI error 7, got %v (%+v)", err, g)
			}
			for _, w := range tc.want {
				if !strings.Contains(e.Msg, w) {
					t.Errorf("message %q does not say %q", e.Msg, w)
				}
			}
		})
	}
}

func TestParsePriority(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Priority
	}{{"high", PriorityHigh}, {"Normal", PriorityNormal}, {"LOW", PriorityLow}, {" low\t", PriorityLow}} {
		p, err := ParsePriority("f", tc.in)
		if err != nil || p != tc.want {
			t.Errorf("%q: %v %v, want %v", tc.in, p, err, tc.want)
		}
		if back, err := ParsePriority("f", p.String()); err != nil || back != p {
			t.Errorf("%v does not read back from %q: %v", p, p.String(), err)
		}
	}
	for _, bad := range []string{"", "0", "highest", "hi gh", "medium"} {
		if _, err := ParsePriority("annotation x", bad); err == nil || !strings.Contains(err.Error(), "annotation x") {
			t.Errorf("%q: %v", bad, err)
		}
	}
	// The values are HTB's: a lower one borrows first.
	if !(PriorityHigh < PriorityNormal && PriorityNormal < PriorityLow) || PriorityHigh != 0 {
		t.Error("priority order")
	}
	if s := Priority(7).String(); s != "Priority(7)" {
		t.Errorf("unknown priority prints %q", s)
	}
}

func TestAdmit(t *testing.T) {
	const m = 1_000_000
	for _, tc := range []struct {
		name                        string
		capacity, reserved, request uint64
		ok                          bool
	}{
		{"fits", 100 * m, 50 * m, 30 * m, true},
		{"fills exactly", 100 * m, 70 * m, 30 * m, true},
		{"one bit over", 100 * m, 70*m + 1, 30 * m, false},
		{"alone above capacity", 100 * m, 0, 100*m + 1, false},
		{"best effort on a full node", 100 * m, 100 * m, 0, true},
		{"best effort on an over-reserved node", 100 * m, 150 * m, 0, true},
		{"over-reserved node", 100 * m, 150 * m, 1, false},
		{"sum would overflow", 100 * m, math.MaxUint64, 30 * m, false},
		{"request would overflow", math.MaxUint64, 1, math.MaxUint64, false},
		{"no capacity", 0, 0, 1000, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Admit("egress", tc.capacity, tc.reserved, tc.request)
			if (err == nil) != tc.ok {
				t.Fatalf("Admit: %v, want ok=%v", err, tc.ok)
			}
			var e *types.Error
			if err != nil && (!errors.As(err, &e) || e.Code != ErrBandwidthUnavailable) {
				t.Fatalf("want CNI error %d, got %v", ErrBandwidthUnavailable, err)
			}
		})
	}
	err := Admit("ingress", 100*m, 80*m, 30*m)
	want := "ingress: node capacity 100Mbit/s, 80Mbit/s already reserved by other pods, this pod requests 30Mbit/s (qoscni.io/ingress-bandwidth-request)"
	var e *types.Error
	if !errors.As(err, &e) || e.Msg != want {
		t.Errorf("message %q, want %q", err, want)
	}
	if err := admit("egress", 10*m, 10*m, 1_500_000, true); err == nil || !strings.Contains(err.Error(), "1.5Mbit/s (its DRA claims)") {
		t.Errorf("a claimed request's refusal names the claims: %v", err)
	}
	if err := Admit("egress", 10*m, 10*m, 1_500_000); err == nil || !strings.Contains(err.Error(), "1.5Mbit/s ("+AnnotationEgressRequest+")") {
		t.Errorf("egress message: %v", err)
	}
}

func TestFormatRate(t *testing.T) {
	for _, tc := range []struct {
		bits uint64
		want string
	}{
		{0, "0bit/s"},
		{999, "999bit/s"},
		{1000, "1kbit/s"},
		{1500, "1.5kbit/s"},
		{30_000_000, "30Mbit/s"},
		{1_500_000_000, "1.5Gbit/s"},
		{20_000_400, "20.0004Mbit/s"},
		{1_000_000_001, "1.000000001Gbit/s"},
		{10_000_000_000, "10Gbit/s"},
		{MaxRateBits, "1Pbit/s"},
		{math.MaxUint64, "18.446744073709551615Ebit/s"},
	} {
		if got := FormatRate(tc.bits); got != tc.want {
			t.Errorf("FormatRate(%d) = %q, want %q", tc.bits, got, tc.want)
		}
	}
}

func TestClampString(t *testing.T) {
	for _, tc := range []struct {
		c    Clamp
		want string
	}{
		{Clamp{SettingRequest, 50_000_000, 20_000_000}, "request 50Mbit/s clamped to 20Mbit/s"},
		{Clamp{SettingQueueDelay, uint64(time.Second), uint64(100 * time.Millisecond)}, "queue_delay 1s clamped to 100ms"},
		{Clamp{SettingCburst, 2 << 20, 1 << 20}, "cburst 2097152 B clamped to 1048576 B"},
	} {
		if got := tc.c.String(); got != tc.want {
			t.Errorf("%q, want %q", got, tc.want)
		}
	}
}
