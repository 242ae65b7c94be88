package shaping_test

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/shaping"
)

// Bits of FuzzResolveShaping's present argument: which annotations exist
// (an empty value is not the same as no annotation) and whether the
// runtime sent a bandwidth capability at all.
const (
	hasIngressRate = 1 << iota
	hasEgressRate
	hasIngressBurst
	hasEgressBurst
	hasMaxQueueDelay
	hasRuntime
)

// FuzzResolveShaping feeds every input Resolve takes: the five annotation
// strings, runtimeConfig.bandwidth, the plugin config defaults and their
// delay, and the device MTU (folded into 68..65535, what a Linux link can
// have; the plugin passes the config's mtu or the device's).
func FuzzResolveShaping(f *testing.F) {
	f.Fuzz(func(t *testing.T,
		ingressRate, egressRate, ingressBurst, egressBurst, maxQueueDelay string, present uint8,
		rtIngressRate, rtIngressBurst, rtEgressRate, rtEgressBurst uint64,
		cfgIngressRate, cfgIngressBurst, cfgEgressRate, cfgEgressBurst uint64,
		cfgMaxQueueDelay string, mtu int) {
		mtu = 68 + int(uint64(mtu)%(65535-68+1))
		in := shaping.Inputs{
			Annotations: map[string]string{},
			Config: shaping.Rates{IngressRate: cfgIngressRate, IngressBurst: cfgIngressBurst,
				EgressRate: cfgEgressRate, EgressBurst: cfgEgressBurst},
		}
		// Resolve takes the config's delay typed: the config parser reads
		// it with ParseDelay first, and refuses it there.
		if cfgMaxQueueDelay != "" {
			d, err := shaping.ParseDelay("maxQueueDelay", cfgMaxQueueDelay)
			if err != nil {
				var e *types.Error
				if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "maxQueueDelay") {
					t.Fatalf("config delay %q: want CNI error 7 naming maxQueueDelay, got %v", cfgMaxQueueDelay, err)
				}
				return
			}
			in.ConfigMaxQueueDelay = d
		}
		for _, a := range []struct {
			bit        uint8
			key, value string
		}{
			{hasIngressRate, shaping.AnnotationIngressRate, ingressRate},
			{hasEgressRate, shaping.AnnotationEgressRate, egressRate},
			{hasIngressBurst, shaping.AnnotationIngressBurst, ingressBurst},
			{hasEgressBurst, shaping.AnnotationEgressBurst, egressBurst},
			{hasMaxQueueDelay, shaping.AnnotationMaxQueueDelay, maxQueueDelay},
		} {
			if present&a.bit != 0 {
				in.Annotations[a.key] = a.value
			}
		}
		if present&hasRuntime != 0 {
			in.Runtime = &shaping.Rates{IngressRate: rtIngressRate, IngressBurst: rtIngressBurst,
				EgressRate: rtEgressRate, EgressBurst: rtEgressBurst}
		}

		plan, err := shaping.Resolve(in, mtu)
		if err != nil {
			checkNamesInput(t, err, in)
			return
		}
		checkDirection(t, "ingress", plan.Ingress, in, shaping.AnnotationIngressRate,
			func(r *shaping.Rates) (uint64, uint64) { return r.IngressRate, r.IngressBurst }, mtu)
		checkDirection(t, "egress", plan.Egress, in, shaping.AnnotationEgressRate,
			func(r *shaping.Rates) (uint64, uint64) { return r.EgressRate, r.EgressBurst }, mtu)
	})
}

// checkNamesInput requires a CNI error 7 whose message names an input
// that was actually given, so a user can find what to fix.
func checkNamesInput(t *testing.T, err error, in shaping.Inputs) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || e.Msg == "" {
		t.Fatalf("want CNI error %d with a message, got %T %v", types.ErrInvalidNetworkConfig, err, err)
	}
	var given []string
	for k := range in.Annotations {
		given = append(given, "annotation "+k)
	}
	if in.ConfigMaxQueueDelay != 0 {
		given = append(given, "maxQueueDelay")
	}
	if in.Runtime != nil {
		given = append(given, "runtimeConfig.bandwidth.ingressRate", "runtimeConfig.bandwidth.egressRate")
	}
	// A config burst is named when its rate is set and the burst is not.
	for field, v := range map[string]uint64{
		"ingressRate": in.Config.IngressRate, "ingressBurst": in.Config.IngressRate,
		"egressRate": in.Config.EgressRate, "egressBurst": in.Config.EgressRate,
	} {
		if v != 0 {
			given = append(given, field)
		}
	}
	for _, g := range given {
		if strings.HasPrefix(e.Msg, "invalid "+g+" ") {
			return
		}
	}
	t.Fatalf("message %q names none of the given inputs %q", e.Msg, given)
}

func checkDirection(t *testing.T, dir string, p *shaping.Params, in shaping.Inputs, rateAnno string,
	pick func(*shaping.Rates) (rate, burst uint64), mtu int) {
	t.Helper()
	_, fromAnno := in.Annotations[rateAnno]
	var rtRate, rtBurst uint64
	if in.Runtime != nil {
		rtRate, rtBurst = pick(in.Runtime)
	}
	cfgRate, cfgBurst := pick(&in.Config)
	want := ""
	switch {
	case fromAnno:
		want = shaping.SourceAnnotation
	case rtRate != 0:
		want = shaping.SourceRuntimeConfig
	case cfgRate != 0:
		want = shaping.SourceConfig
	}
	if p == nil {
		if want != "" {
			t.Fatalf("%s not shaped although %s sets it", dir, want)
		}
		return
	}
	if p.Source != want {
		t.Fatalf("%s: source %q, want %q", dir, p.Source, want)
	}
	if p.RateBits < shaping.MinRateBits || p.RateBits > shaping.MaxRateBits {
		t.Fatalf("%s: rate %d outside 1k..1P", dir, p.RateBits)
	}
	frame := shaping.PeakBurst(mtu) / 2
	switch p.Source {
	case shaping.SourceRuntimeConfig:
		if p.RateBits != rtRate {
			t.Fatalf("%s: rate %d, runtime asked %d", dir, p.RateBits, rtRate)
		}
		if rtBurst != 0 && rtBurst <= rtRate/4 {
			checkExplicitBurst(t, dir, p, rtBurst, frame)
		}
	case shaping.SourceConfig:
		if p.RateBits != cfgRate {
			t.Fatalf("%s: rate %d, config asked %d", dir, p.RateBits, cfgRate)
		}
		checkExplicitBurst(t, dir, p, cfgBurst, frame)
	}
	// Nothing a pod writes passes the (default) ceilings.
	c := shaping.DefaultCeilings
	if p.MaxQueueDelay < shaping.MinMaxQueueDelay || p.MaxQueueDelay > c.MaxQueueDelay {
		t.Fatalf("%s: delay %v out of range", dir, p.MaxQueueDelay)
	}
	// A full-size frame must pass the bucket (where the kernel can hold
	// one at that rate), and the kernel takes 32 bits.
	if p.BurstBytes < min(frame, shaping.MaxBurstBytesAt(p.RateBytes())) || p.BurstBytes > max(c.MaxBurstBytes, frame) ||
		p.BurstBytes > shaping.MaxBurstBytesAt(p.RateBytes()) {
		t.Fatalf("%s: burst %d B, frame %d B", dir, p.BurstBytes, frame)
	}
	if p.LimitBytes < min(8*frame, c.MaxQueueBytes, math.MaxUint32) || p.LimitBytes > max(c.MaxQueueBytes, 2*frame) {
		t.Fatalf("%s: limit %d B, below 8 frames of %d B or above the ceiling", dir, p.LimitBytes, frame)
	}
	// Without a peak rate TBF sends GSO packets whole: the queue holds one.
	peak := shaping.UsesPeak(p.RateBytes(), p.LimitBytes)
	if !peak && p.LimitBytes < 128<<10 {
		t.Fatalf("%s: no peak rate and limit %d < 128 KiB", dir, p.LimitBytes)
	}
	if peak && shaping.PeakBytes(p.RateBytes()) > math.MaxUint32 {
		t.Fatalf("%s: peak rate %d does not fit go-tc's 32 bits", dir, shaping.PeakBytes(p.RateBytes()))
	}
}

// checkExplicitBurst: a burst given in bits becomes bytes, rounded up, at
// least one frame, at most the ceiling and what the kernel can hold.
func checkExplicitBurst(t *testing.T, dir string, p *shaping.Params, bits, frame uint64) {
	t.Helper()
	want := max(bits/8+min(bits%8, 1), frame)
	if want > shaping.DefaultCeilings.MaxBurstBytes {
		want = max(shaping.DefaultCeilings.MaxBurstBytes, frame)
	}
	want = min(want, shaping.MaxBurstBytesAt(p.RateBytes()))
	if p.BurstBytes != want {
		t.Fatalf("%s: burst %d B from %d bits, want %d", dir, p.BurstBytes, bits, want)
	}
}

// FuzzResolveGuarantee feeds the guarantee's own inputs (requests,
// priority, limits, the node capacity and the operator's request ceiling)
// through Resolve and ResolveGuarantee as the plugin calls them: whatever
// a pod writes is refused with a CNI error 7 naming an annotation, or
// gives classes within the capacity, the pod's limit and the ceilings.
func FuzzResolveGuarantee(f *testing.F) {
	f.Add("10M", "100M", "1G", "5M", "high", uint8(0xff), uint64(10_000_000_000), uint64(0), uint64(0))
	f.Add("2G", "", "100M", "", "Low", uint8(0x15), uint64(1_000_000_000), uint64(1_000_000_000), uint64(50_000_000))
	f.Fuzz(func(t *testing.T, ingressRequest, egressRequest, ingressRate, ingressBurst, priority string, present uint8,
		ingressCapacity, egressCapacity, maxRequest uint64) {
		// The config parser takes capacities and the request ceiling as 0
		// (none) or rates of 1k..1P.
		fold := func(v uint64) uint64 {
			if v == 0 {
				return 0
			}
			return shaping.MinRateBits + v%(shaping.MaxRateBits-shaping.MinRateBits+1)
		}
		ingressCapacity, egressCapacity, maxRequest = fold(ingressCapacity), fold(egressCapacity), fold(maxRequest)
		in := shaping.Inputs{Annotations: map[string]string{}, Ceilings: shaping.Ceilings{MaxRequestBits: maxRequest}}
		for i, kv := range [][2]string{
			{shaping.AnnotationIngressRequest, ingressRequest}, {shaping.AnnotationEgressRequest, egressRequest},
			{shaping.AnnotationIngressRate, ingressRate}, {shaping.AnnotationIngressBurst, ingressBurst},
			{shaping.AnnotationPriority, priority},
		} {
			if present&(1<<i) != 0 {
				in.Annotations[kv[0]] = kv[1]
			}
		}
		limits, err := shaping.Resolve(in, 1500)
		if err != nil {
			return // FuzzResolveShaping's business
		}
		capacity := shaping.Capacity{IngressBits: ingressCapacity, EgressBits: egressCapacity}
		g, err := shaping.ResolveGuarantee(in, limits, capacity, 1500)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig ||
				!strings.HasPrefix(e.Msg, "invalid annotation qoscni.io/") {
				t.Fatalf("want CNI error 7 naming a qoscni.io annotation, got %v", err)
			}
			return
		}
		for _, d := range []struct {
			name      string
			c         *shaping.Class
			capacity  uint64
			limit     *shaping.Params
			requested bool
		}{
			{"ingress", g.Ingress, ingressCapacity, limits.Ingress, present&1 != 0},
			{"egress", g.Egress, egressCapacity, limits.Egress, present&2 != 0},
		} {
			if (d.c == nil) != (d.capacity == 0) {
				t.Fatalf("%s: class %+v with capacity %d", d.name, d.c, d.capacity)
			}
			if d.c == nil {
				continue
			}
			c := d.c
			if c.CeilBits == 0 || c.CeilBits > d.capacity || (d.limit != nil && c.CeilBits > d.limit.RateBits) {
				t.Fatalf("%s: ceil %d, capacity %d, limit %+v", d.name, c.CeilBits, d.capacity, d.limit)
			}
			if (c.RequestBits != 0) != d.requested {
				t.Fatalf("%s: request %d, annotation given: %v", d.name, c.RequestBits, d.requested)
			}
			if d.limit != nil && c.RequestBits > d.limit.RateBits || maxRequest != 0 && c.RequestBits > maxRequest {
				t.Fatalf("%s: request %d above the limit %+v or the ceiling %d", d.name, c.RequestBits, d.limit, maxRequest)
			}
			if c.Priority > shaping.PriorityLow {
				t.Fatalf("%s: priority %d", d.name, c.Priority)
			}
			frame := shaping.PeakBurst(1500) / 2
			base := c.RequestBits
			if base == 0 {
				base = c.CeilBits
			}
			if c.BurstBytes == 0 || c.BurstBytes > shaping.MaxBurstBytesAt(base/8) || c.BurstBytes > max(shaping.DefaultCeilingBurstBytes, frame) ||
				c.CburstBytes == 0 || c.CburstBytes > shaping.MaxBurstBytesAt(c.CeilBits/8) || c.CburstBytes > max(shaping.DefaultCeilingBurstBytes, frame) {
				t.Fatalf("%s: buckets %d/%d at %d/%d bit/s", d.name, c.BurstBytes, c.CburstBytes, base, c.CeilBits)
			}
			if c.QueueBytes < 2*frame || c.QueueBytes > max(shaping.DefaultCeilingQueueBytes, 2*frame) {
				t.Fatalf("%s: queue %d", d.name, c.QueueBytes)
			}
		}
	})
}
