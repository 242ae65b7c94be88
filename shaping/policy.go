// Package shaping turns a pod's bandwidth inputs into per-direction shaping
// parameters, and those into a tc pipeline built with go-tc: a shaping qdisc
// at the root of the host-side veth for traffic into the pod, and an IFB fed
// by a mirred redirect from the veth's ingress hook for traffic out of it.
package shaping

import (
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"k8s.io/apimachinery/pkg/api/resource"
)

// Annotation keys read from the pod (through the runtime's
// io.kubernetes.cri.pod-annotations capability).
const (
	AnnotationIngressRate   = "kubernetes.io/ingress-bandwidth"
	AnnotationEgressRate    = "kubernetes.io/egress-bandwidth"
	AnnotationIngressBurst  = "qoscni.io/ingress-burst"
	AnnotationEgressBurst   = "qoscni.io/egress-burst"
	AnnotationMaxQueueDelay = "qoscni.io/max-queue-delay"
)

// Sources of a direction's rate, in precedence order.
const (
	SourceAnnotation    = "annotation"
	SourceRuntimeConfig = "runtimeConfig"
	SourceConfig        = "config"
)

// Limits of the accepted values.
const (
	// MinRateBits and MaxRateBits are what Kubernetes accepts for the
	// bandwidth annotations: 1k to 1P bit/s.
	MinRateBits uint64 = 1_000
	MaxRateBits uint64 = 1_000_000_000_000_000
	// DefaultMaxQueueDelay is the queueing-delay budget when none is given.
	DefaultMaxQueueDelay = 10 * time.Millisecond
	MinMaxQueueDelay     = 100 * time.Microsecond
	MaxMaxQueueDelay     = 10 * time.Second
	// ethHeader is added to the MTU: qdiscs count whole frames.
	ethHeader = 14
	// minQueueFrames is the queue's floor. Below about 10 Mbit/s the
	// delay budget holds fewer frames than TCP needs: with 2 frames of
	// queue one flow got 0.70 of 1 Mbit/s, with 6 frames 0.96 (bench/).
	// At 10 Mbit/s and above the 10 ms budget already holds 8 frames.
	minQueueFrames = 8
	// runtimeBurstShare caps a burst from the runtime at this share of one
	// second of the rate; above it the burst is treated as not given, so
	// the first second stays within 1.25x of the rate. containerd sends
	// 4294967295 bits and CRI-O about 8x that for every pod.
	runtimeBurstShare = 4
)

// Inputs are everything that can set a pod's shaping.
type Inputs struct {
	Annotations map[string]string
	Runtime     *Rates // runtimeConfig.bandwidth
	Config      Rates  // plugin config defaults
	// ConfigMaxQueueDelay is the plugin config's maxQueueDelay ("" = default).
	ConfigMaxQueueDelay string
}

// Rates are CNI-convention rates and bursts: bit/s and bits, 0 = unset.
type Rates struct {
	IngressRate, IngressBurst, EgressRate, EgressBurst uint64
}

// Params are one direction's effective shaping.
type Params struct {
	RateBits      uint64
	BurstBytes    uint64
	LimitBytes    uint64
	MaxQueueDelay time.Duration
	Source        string
}

// RateBytes is the rate in bytes per second, as the kernel takes it.
func (p *Params) RateBytes() uint64 { return p.RateBits / 8 }

// Plan is the shaping of one attachment; nil means not shaped.
type Plan struct {
	Ingress *Params
	Egress  *Params
}

// Empty reports whether nothing is shaped.
func (p Plan) Empty() bool { return p.Ingress == nil && p.Egress == nil }

func invalid(field string, value any, why string) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("invalid %s %v: %s", field, value, why), "")
}

// Resolve applies precedence (annotations, then runtimeConfig, then plugin
// config) per direction and derives burst and queue limit. mtu is the
// device MTU. Every bad value is a CNI error 7 naming its source.
func Resolve(in Inputs, mtu int) (Plan, error) {
	delay := DefaultMaxQueueDelay
	if in.ConfigMaxQueueDelay != "" {
		d, err := parseDelay("maxQueueDelay", in.ConfigMaxQueueDelay)
		if err != nil {
			return Plan{}, err
		}
		delay = d
	}
	if v, ok := in.Annotations[AnnotationMaxQueueDelay]; ok {
		d, err := parseDelay("annotation "+AnnotationMaxQueueDelay, v)
		if err != nil {
			return Plan{}, err
		}
		delay = d
	}
	if err := validateConfig(in.Config); err != nil {
		return Plan{}, err
	}
	ing, err := resolveDirection(in, dirIngress, delay, mtu)
	if err != nil {
		return Plan{}, err
	}
	eg, err := resolveDirection(in, dirEgress, delay, mtu)
	if err != nil {
		return Plan{}, err
	}
	return Plan{Ingress: ing, Egress: eg}, nil
}

type direction struct {
	name                 string
	rateAnno, burstAnno  string
	rateField, burstFld  string
	runtimeRate, runBurs func(*Rates) uint64
}

var (
	dirIngress = direction{"ingress", AnnotationIngressRate, AnnotationIngressBurst, "ingressRate", "ingressBurst",
		func(r *Rates) uint64 { return r.IngressRate }, func(r *Rates) uint64 { return r.IngressBurst }}
	dirEgress = direction{"egress", AnnotationEgressRate, AnnotationEgressBurst, "egressRate", "egressBurst",
		func(r *Rates) uint64 { return r.EgressRate }, func(r *Rates) uint64 { return r.EgressBurst }}
)

func resolveDirection(in Inputs, d direction, delay time.Duration, mtu int) (*Params, error) {
	// An explicit burst annotation is validated even when another source
	// sets the rate, so a typo never passes silently.
	var annoBurst uint64
	if v, ok := in.Annotations[d.burstAnno]; ok {
		b, err := parseQuantity("annotation "+d.burstAnno, v, false)
		if err != nil {
			return nil, err
		}
		annoBurst = b
	}
	if v, ok := in.Annotations[d.rateAnno]; ok {
		rate, err := parseQuantity("annotation "+d.rateAnno, v, true)
		if err != nil {
			return nil, err
		}
		return derive(rate, annoBurst, true, delay, mtu, SourceAnnotation), nil
	}
	if in.Runtime != nil {
		if rate := d.runtimeRate(in.Runtime); rate != 0 {
			if err := checkRate("runtimeConfig.bandwidth."+d.rateField, rate); err != nil {
				return nil, err
			}
			burst := d.runBurs(in.Runtime)
			if burst > rate/runtimeBurstShare {
				burst = 0
			}
			return derive(rate, burst, true, delay, mtu, SourceRuntimeConfig), nil
		}
	}
	if rate := d.runtimeRate(&in.Config); rate != 0 {
		return derive(rate, d.runBurs(&in.Config), true, delay, mtu, SourceConfig), nil
	}
	return nil, nil
}

// validateConfig applies the reference bandwidth plugin's rules to the
// plugin config defaults: a rate needs a burst.
func validateConfig(c Rates) error {
	for _, d := range []direction{dirIngress, dirEgress} {
		rate, burst := d.runtimeRate(&c), d.runBurs(&c)
		if rate == 0 {
			continue
		}
		if err := checkRate(d.rateField, rate); err != nil {
			return err
		}
		if burst == 0 {
			return invalid(d.burstFld, 0, fmt.Sprintf("%s is set, so %s must be set too (bits)", d.rateField, d.burstFld))
		}
	}
	return nil
}

func checkRate(field string, rate uint64) error {
	if rate < MinRateBits || rate > MaxRateBits {
		return invalid(field, rate, "must be between 1k and 1P bit/s")
	}
	return nil
}

// parseQuantity reads a Kubernetes quantity in bits (rates in bit/s).
func parseQuantity(field, v string, isRate bool) (uint64, error) {
	q, err := resource.ParseQuantity(strings.TrimSpace(v))
	if err != nil {
		return 0, invalid(field, fmt.Sprintf("%q", v), "not a Kubernetes quantity (e.g. 10M, 500k, 1G)")
	}
	if q.Sign() < 0 {
		return 0, invalid(field, fmt.Sprintf("%q", v), "must not be negative")
	}
	if isRate {
		// Kubernetes' own bounds, compared as quantities so "1.5k" and
		// "1Ki" behave exactly as the API server treats them.
		if q.Cmp(resource.MustParse("1k")) < 0 || q.Cmp(resource.MustParse("1P")) > 0 {
			return 0, invalid(field, fmt.Sprintf("%q", v), "must be between 1k and 1P bit/s")
		}
	}
	n, ok := q.AsInt64()
	if !ok {
		// Fractional or huge: round up to whole bits.
		f := q.AsApproximateFloat64()
		if f > math.MaxInt64 {
			return 0, invalid(field, fmt.Sprintf("%q", v), "too large")
		}
		n = int64(math.Ceil(f))
	}
	return uint64(n), nil
}

func parseDelay(field, v string) (time.Duration, error) {
	d, err := time.ParseDuration(strings.TrimSpace(v))
	if err != nil {
		return 0, invalid(field, fmt.Sprintf("%q", v), "not a Go duration (e.g. 10ms)")
	}
	if d < MinMaxQueueDelay || d > MaxMaxQueueDelay {
		return 0, invalid(field, fmt.Sprintf("%q", v), fmt.Sprintf("must be between %v and %v", MinMaxQueueDelay, MaxMaxQueueDelay))
	}
	return d, nil
}

// derive computes burst and queue limit.
//
// The queue holds at most the delay budget's worth of data at the rate,
// never less than minQueueFrames frames. The token bucket (burst) is
// separate from it: by default burstWindow of the rate, at least two
// frames. A bucket that deep lets a sender that paused (TCP recovering
// from a drop, an ACK clock bunched up by the IFB) catch up instead of
// losing that time for good, and adds nothing to queueing delay: packets
// only wait in the queue. With a peak rate (see UsesPeak) TBF cuts every
// packet to two frames first, so the deep bucket never lets a 64 kB GSO
// packet meet the short queue whole. Queues long enough for GSO packets
// (high rates) go without a peak rate; there the bucket is the budget's
// worth and the queue holds a whole bucket, as TBF then sends packets up to
// the burst whole.
func derive(rateBits, burstBits uint64, explicit bool, delay time.Duration, mtu int, source string) *Params {
	frame := uint64(mtu + ethHeader)
	budget := bytesIn(rateBits, delay)
	limit := min(max(budget, minQueueFrames*frame), math.MaxUint32)
	peak := UsesPeak(rateBits/8, limit)
	var burst uint64
	switch {
	case burstBits != 0 && explicit:
		burst = max(ceilDiv(burstBits, 8), frame)
	case peak:
		burst = max(bytesIn(rateBits, burstWindow), 2*frame)
	default:
		burst = max(budget, 2*frame)
	}
	burst = min(burst, math.MaxUint32)
	if !peak {
		limit = min(max(limit, burst), math.MaxUint32)
	}
	return &Params{RateBits: rateBits, BurstBytes: burst, LimitBytes: limit, MaxQueueDelay: delay, Source: source}
}

// burstWindow is the default depth of the token bucket in time at the
// rate: a fresh pod's first second runs at most 5% over its limit. In a
// single-flow test at 10 Mbit/s with the return path through the IFB,
// goodput went from 0.84 of the rate (bucket = 10 ms) to 0.96 (50 ms),
// with the same queue and RTT under load.
const burstWindow = 50 * time.Millisecond

// peakFactor sets the peak rate relative to the rate. The peak only has
// to exceed the rate for TBF to take a small per-packet size (PeakBurst);
// ten times the rate lets a full bucket drain in a tenth of its window.
const peakFactor = 10

// peakQueueBelow: a queue this short cannot take a 64 kB GSO packet or two
// whole, so packets are cut to frames first (peak mode). Longer queues
// (above about 100 Mbit/s at a 10 ms budget) take them whole, and a peak
// bucket of two frames would cost a timer wake-up every few microseconds
// at those rates (1 Gbit/s egress fell to 0.84 of the rate with it).
const peakQueueBelow = 128 << 10

// UsesPeak reports whether the TBF for this byte rate and queue limit
// carries a peak rate. go-tc holds TBF's peak rate in 32 bits.
func UsesPeak(rateBytes, limitBytes uint64) bool {
	return limitBytes < peakQueueBelow && rateBytes*peakFactor <= math.MaxUint32
}

// PeakBytes is the peak rate (bytes/s) TBF uses for a byte rate.
func PeakBytes(rateBytes uint64) uint64 { return rateBytes * peakFactor }

// PeakBurst is the peak bucket, and so the largest packet TBF sends
// whole: two frames of the device MTU.
func PeakBurst(mtu int) uint64 { return 2 * uint64(mtu+ethHeader) }

// bytesIn is how many bytes the rate moves in d.
func bytesIn(rateBits uint64, d time.Duration) uint64 {
	f := float64(rateBits) / 8 * d.Seconds()
	if f > math.MaxUint64/2 {
		return math.MaxUint64 / 2
	}
	return uint64(math.Ceil(f))
}

func ceilDiv(a, b uint64) uint64 { return a/b + min(a%b, 1) }
