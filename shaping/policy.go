// Package shaping turns a pod's bandwidth inputs into per-direction shaping
// parameters, and those into a tc pipeline built with go-tc: a shaping qdisc
// at the root of the host-side veth for traffic into the pod, and an IFB fed
// by a mirred redirect from the veth's ingress hook for traffic out of it.
package shaping

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/qoscni/qoscni/internal/state"
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

// Calico's names for the rate and burst (qos.projectcalico.org, same
// units: bit/s and bits), accepted so that a pod moved from Calico keeps
// its limits. Where a pod has both names, qoscni's own wins.
const (
	CalicoIngressBandwidth = "qos.projectcalico.org/ingressBandwidth"
	CalicoEgressBandwidth  = "qos.projectcalico.org/egressBandwidth"
	CalicoIngressBurst     = "qos.projectcalico.org/ingressBurst"
	CalicoEgressBurst      = "qos.projectcalico.org/egressBurst"
)

// A token bucket's peak rate (bit/s) and the bucket it is measured with
// (bytes): a pod may send its burst no faster than the peak. qoscni's
// names, and Calico's (same units) where a pod has none of qoscni's.
const (
	AnnotationIngressPeakRate = "qoscni.io/ingress-peak-rate"
	AnnotationEgressPeakRate  = "qoscni.io/egress-peak-rate"
	AnnotationIngressMinBurst = "qoscni.io/ingress-minburst"
	AnnotationEgressMinBurst  = "qoscni.io/egress-minburst"
	CalicoIngressPeakrate     = "qos.projectcalico.org/ingressPeakrate"
	CalicoEgressPeakrate      = "qos.projectcalico.org/egressPeakrate"
	CalicoIngressMinburst     = "qos.projectcalico.org/ingressMinburst"
	CalicoEgressMinburst      = "qos.projectcalico.org/egressMinburst"
)

// Bounds of the peak settings: TBF keeps the peak rate in 32 bits of
// bytes/s (34 Gbit/s); the minburst range is Calico's, 1k to 100M bytes.
const (
	MaxPeakBits     = math.MaxUint32 * 8
	MinMinBurstByte = 1000
	MaxMinBurstByte = 100_000_000
)

// CalicoPrefix starts every Calico QoS annotation.
const CalicoPrefix = "qos.projectcalico.org/"

// annotation is the value of key, else of its alias ("" = none), and the
// key it was read from.
func annotation(a map[string]string, key, alias string) (v, from string, ok bool) {
	if v, ok := a[key]; ok {
		return v, key, true
	}
	if v, ok := a[alias]; ok && alias != "" {
		return v, alias, true
	}
	return "", "", false
}

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
	// MinMaxQueueDelay is the smallest budget accepted from anyone;
	// MaxMaxQueueDelay the largest an operator may allow (a pod gets at
	// most its ceiling, see Ceilings).
	MinMaxQueueDelay = 100 * time.Microsecond
	MaxMaxQueueDelay = 10 * time.Second
	// ethHeader is added to the MTU: qdiscs count whole frames.
	ethHeader = 14
	// minQueueFrames is the queue's floor. Below about 10 Mbit/s the
	// delay budget holds fewer frames than TCP needs: with 2 frames of
	// queue one flow got 0.70 of 1 Mbit/s, with 6 frames 0.96 (test/bench/).
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
	// ConfigMaxQueueDelay is the plugin config's maxQueueDelay (0 =
	// DefaultMaxQueueDelay), parsed and bounded by the config parser
	// (ParseDelay, within the ceiling) when the config was read.
	ConfigMaxQueueDelay time.Duration
	// Ceilings bound what any input can make the kernel hold; the zero
	// value means DefaultCeilings.
	Ceilings Ceilings
	// Granted is the bandwidth the scheduler placed for the pod (its DRA
	// claims on the node's bandwidth device), nil for none.
	Granted *Granted
}

// Granted is a pod's bandwidth from its DRA claims, bit/s per direction.
// In a direction where it is not 0 it is the pod's request, and the
// request annotation is not read: the scheduler counted the claim against
// the node's capacity, not the annotation.
type Granted struct {
	IngressBits, EgressBits uint64
}

// Ceilings are the operator's bounds on the kernel resources a pod's
// shaping may take. Pod authors are not trusted with node memory: a value
// above a ceiling is clamped, and the clamp is recorded (Params.Clamps) so
// that the plugin logs it and the agent exports it, never honoured.
type Ceilings struct {
	// MaxQueueDelay bounds the queueing-delay budget a pod may ask for.
	MaxQueueDelay time.Duration
	// MaxBurstBytes bounds the token bucket.
	MaxBurstBytes uint64
	// MaxQueueBytes bounds each direction's queue.
	MaxQueueBytes uint64
	// MaxRequestBits bounds the guaranteed rate (bit/s) a pod may request
	// per direction; 0 leaves only the node capacity (see Admit).
	MaxRequestBits uint64
}

// Defaults and bounds of the ceilings. The defaults keep the shipped queue
// policy (a 10 ms budget) up to about 13 Gbit/s, and keep any pod from
// sizing a queue or a bucket beyond 16 MiB per direction.
const (
	DefaultCeilingQueueDelay = 100 * time.Millisecond
	DefaultCeilingBurstBytes = 16 << 20
	DefaultCeilingQueueBytes = 16 << 20
	// MinCeilingBytes is the smallest queue or bucket ceiling an operator
	// may set: below it a queue without a peak rate could not take one
	// 64 kB GSO packet (gsoQueue), and a bucket would cut every one.
	MinCeilingBytes = gsoQueue
)

// DefaultCeilings are the ceilings of a config that sets none.
var DefaultCeilings = Ceilings{MaxQueueDelay: DefaultCeilingQueueDelay, MaxBurstBytes: DefaultCeilingBurstBytes, MaxQueueBytes: DefaultCeilingQueueBytes}

// orDefaults fills unset fields.
func (c Ceilings) orDefaults() Ceilings {
	if c.MaxQueueDelay == 0 {
		c.MaxQueueDelay = DefaultCeilings.MaxQueueDelay
	}
	if c.MaxBurstBytes == 0 {
		c.MaxBurstBytes = DefaultCeilings.MaxBurstBytes
	}
	if c.MaxQueueBytes == 0 {
		c.MaxQueueBytes = DefaultCeilings.MaxQueueBytes
	}
	return c
}

// Settings a ceiling can clamp (Clamp.Setting, and the metric label).
const (
	SettingQueueDelay = state.ClampQueueDelay // nanoseconds
	SettingBurst      = "burst"               // bytes
	SettingQueueLimit = "queue_limit"         // bytes
	SettingCburst     = "cburst"              // bytes
	SettingRequest    = "request"             // bit/s
)

// Clamp says that a setting was asked above its ceiling and what was used.
// Units: nanoseconds for SettingQueueDelay, bit/s for SettingRequest,
// bytes for the others.
type Clamp struct {
	Setting   string
	Requested uint64
	Applied   uint64
}

func (c Clamp) String() string {
	switch c.Setting {
	case SettingQueueDelay:
		return fmt.Sprintf("%s %v clamped to %v", c.Setting, time.Duration(c.Requested), time.Duration(c.Applied))
	case SettingRequest:
		return fmt.Sprintf("%s %s clamped to %s", c.Setting, FormatRate(c.Requested), FormatRate(c.Applied))
	}
	return fmt.Sprintf("%s %d B clamped to %d B", c.Setting, c.Requested, c.Applied)
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
	// PeakBits is the pod's own peak rate (0: none; qoscni may still use
	// one of its own to cut GSO packets, see UsesPeak), and MinBurstBytes
	// the bucket it is measured with (0: one frame of the device).
	PeakBits      uint64
	MinBurstBytes uint64
	// Clamps lists the settings a ceiling cut down (nil: none).
	Clamps []Clamp
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
// config) per direction and derives burst and queue limit within the
// ceilings. mtu is the device MTU. Every bad value is a CNI error 7 naming
// its source; a value above a ceiling is clamped and listed in the
// direction's Clamps.
func Resolve(in Inputs, mtu int) (Plan, error) {
	c := in.Ceilings.orDefaults()
	delay, clamps, err := resolveDelay(in, c)
	if err != nil {
		return Plan{}, err
	}
	if err := validateConfig(in.Config); err != nil {
		return Plan{}, err
	}
	ing, err := resolveDirection(in, dirIngress, delay, mtu, c)
	if err != nil {
		return Plan{}, err
	}
	eg, err := resolveDirection(in, dirEgress, delay, mtu, c)
	if err != nil {
		return Plan{}, err
	}
	for _, p := range []*Params{ing, eg} {
		if p != nil && len(clamps) > 0 {
			p.Clamps = append(slices.Clone(clamps), p.Clamps...)
		}
	}
	return Plan{Ingress: ing, Egress: eg}, nil
}

// resolveDelay is the queueing-delay budget both directions share: the
// annotation, else the config's, else the default, within the ceiling
// (a clamp is returned for the caller to record).
func resolveDelay(in Inputs, c Ceilings) (time.Duration, []Clamp, error) {
	delay := DefaultMaxQueueDelay
	if in.ConfigMaxQueueDelay != 0 {
		delay = in.ConfigMaxQueueDelay
	}
	if v, ok := in.Annotations[AnnotationMaxQueueDelay]; ok {
		d, err := parseDelay("annotation "+AnnotationMaxQueueDelay, v)
		if err != nil {
			return 0, nil, err
		}
		delay = d
	}
	if delay > c.MaxQueueDelay {
		clamp := Clamp{Setting: SettingQueueDelay, Requested: uint64(delay), Applied: uint64(c.MaxQueueDelay)}
		return c.MaxQueueDelay, []Clamp{clamp}, nil
	}
	return delay, nil, nil
}

type direction struct {
	name                     string
	rateAnno, burstAnno      string
	rateAlias, burstAlias    string // Calico's names
	peakAnno, minBurstAnno   string
	peakAlias, minBurstAlias string
	rateField, burstFld      string
	runtimeRate, runBurs     func(*Rates) uint64
}

var (
	dirIngress = direction{"ingress", AnnotationIngressRate, AnnotationIngressBurst, CalicoIngressBandwidth, CalicoIngressBurst,
		AnnotationIngressPeakRate, AnnotationIngressMinBurst, CalicoIngressPeakrate, CalicoIngressMinburst,
		"ingressRate", "ingressBurst",
		func(r *Rates) uint64 { return r.IngressRate }, func(r *Rates) uint64 { return r.IngressBurst }}
	dirEgress = direction{"egress", AnnotationEgressRate, AnnotationEgressBurst, CalicoEgressBandwidth, CalicoEgressBurst,
		AnnotationEgressPeakRate, AnnotationEgressMinBurst, CalicoEgressPeakrate, CalicoEgressMinburst,
		"egressRate", "egressBurst",
		func(r *Rates) uint64 { return r.EgressRate }, func(r *Rates) uint64 { return r.EgressBurst }}
)

func resolveDirection(in Inputs, d direction, delay time.Duration, mtu int, c Ceilings) (*Params, error) {
	rate, burst, source, err := pickRate(in, d)
	if err != nil {
		return nil, err
	}
	peak, minBurst, err := pickPeak(in, d, rate)
	if err != nil || rate == 0 {
		return nil, err
	}
	p := deriveWithin(c, rate, burst, delay, mtu, source)
	p.PeakBits, p.MinBurstBytes = peak, minBurst
	return p, nil
}

// pickPeak reads the direction's peak rate and minburst annotations: a
// peak above the rate and within TBF's 32 bits, a minburst only with a
// peak.
func pickPeak(in Inputs, d direction, rate uint64) (peak, minBurst uint64, err error) {
	pv, pkey, hasPeak := annotation(in.Annotations, d.peakAnno, d.peakAlias)
	if hasPeak {
		field := "annotation " + pkey
		if peak, err = parseQuantity(field, pv, false); err != nil {
			return 0, 0, err
		}
		switch {
		case rate == 0:
			return 0, 0, invalid(field, fmt.Sprintf("%q", pv), "needs a rate for the "+d.name+" direction ("+d.rateAnno+")")
		case peak <= rate:
			return 0, 0, invalid(field, fmt.Sprintf("%q", pv), "must be above the rate "+FormatRate(rate))
		case peak > MaxPeakBits:
			return 0, 0, invalid(field, fmt.Sprintf("%q", pv), "must be at most "+FormatRate(MaxPeakBits)+" (TBF's peak rate)")
		}
	}
	if mv, mkey, ok := annotation(in.Annotations, d.minBurstAnno, d.minBurstAlias); ok {
		field := "annotation " + mkey
		if !hasPeak {
			return 0, 0, invalid(field, fmt.Sprintf("%q", mv), "needs a peak rate ("+d.peakAnno+")")
		}
		if minBurst, err = parseQuantity(field, mv, false); err != nil {
			return 0, 0, err
		}
		if minBurst < MinMinBurstByte || minBurst > MaxMinBurstByte {
			return 0, 0, invalid(field, fmt.Sprintf("%q", mv), "must be between 1k and 100M bytes")
		}
	}
	return peak, minBurst, nil
}

// ResolveAttachment is an attachment's whole shaping, as ADD and the
// agent's reshape both derive it: the limits (Resolve), the classes in the
// node's guarantee hierarchy where there is a capacity (ResolveGuarantee),
// and the limits left to a pipeline of the attachment's own (Split).
func ResolveAttachment(in Inputs, capacity Capacity, mtu int) (Plan, Guarantee, error) {
	plan, err := Resolve(in, mtu)
	if err != nil {
		return Plan{}, Guarantee{}, err
	}
	g, err := ResolveGuarantee(in, plan, capacity, mtu)
	if err != nil {
		return Plan{}, Guarantee{}, err
	}
	if plan, err = Split(plan, g); err != nil {
		return Plan{}, Guarantee{}, err
	}
	return plan, g, nil
}

// Split takes out of plan the directions the node's guarantee hierarchy
// shapes (g), whose limit is their class's ceil, not a token bucket of
// their own. A peak rate asked for there is refused: HTB has none.
func Split(plan Plan, g Guarantee) (Plan, error) {
	for _, d := range []struct {
		p    **Params
		hier bool
		dir  direction
	}{{&plan.Ingress, g.Ingress != nil, dirIngress}, {&plan.Egress, g.Egress != nil, dirEgress}} {
		if !d.hier {
			continue
		}
		if *d.p != nil && (*d.p).PeakBits != 0 {
			return Plan{}, invalid("annotation "+d.dir.peakAnno, FormatRate((*d.p).PeakBits),
				"this node shares its "+d.dir.name+" bandwidth through its guarantee hierarchy (nodeCapacity), whose classes have no peak rate")
		}
		*d.p = nil
	}
	return plan, nil
}

// pickRate is the direction's rate (0: not shaped), the explicit burst in
// bits that goes with it (0: the default policy) and their source. Without
// a rate the burst is the annotation's, if any.
func pickRate(in Inputs, d direction) (rate, burst uint64, source string, err error) {
	// An explicit burst annotation is validated even when another source
	// sets the rate, so a typo never passes silently.
	var annoBurst uint64
	if v, key, ok := annotation(in.Annotations, d.burstAnno, d.burstAlias); ok {
		b, err := parseQuantity("annotation "+key, v, false)
		if err != nil {
			return 0, 0, "", err
		}
		annoBurst = b
	}
	if v, key, ok := annotation(in.Annotations, d.rateAnno, d.rateAlias); ok {
		rate, err := parseQuantity("annotation "+key, v, true)
		if err != nil {
			return 0, 0, "", err
		}
		return rate, annoBurst, SourceAnnotation, nil
	}
	if in.Runtime != nil {
		if rate := d.runtimeRate(in.Runtime); rate != 0 {
			if err := checkRate("runtimeConfig.bandwidth."+d.rateField, rate); err != nil {
				return 0, 0, "", err
			}
			burst := d.runBurs(in.Runtime)
			if burst > rate/runtimeBurstShare {
				burst = 0
			}
			return rate, burst, SourceRuntimeConfig, nil
		}
	}
	if rate := d.runtimeRate(&in.Config); rate != 0 {
		return rate, d.runBurs(&in.Config), SourceConfig, nil
	}
	// No rate: the burst annotation still sizes a guarantee's borrowing
	// (ResolveGuarantee), up to the node capacity.
	return 0, annoBurst, "", nil
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

// ParseBits reads an operator's Kubernetes quantity of bits or bit/s (the
// node capacity, the request ceiling), rounded up to whole bits: any size
// from 0, for the caller to bound. Errors are CNI errors 7 naming field.
func ParseBits(field, v string) (uint64, error) { return parseQuantity(field, v, false) }

// parseQuantity reads a Kubernetes quantity in bits (rates in bit/s).
func parseQuantity(field, v string, isRate bool) (uint64, error) {
	if outsizedQuantity(strings.TrimSpace(v)) {
		return 0, invalid(field, fmt.Sprintf("%.40q", v), fmt.Sprintf("longer than %d characters or an exponent beyond ±99", maxQuantityLen))
	}
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

// maxQuantityLen bounds a quantity's text: no rate or burst needs more.
const maxQuantityLen = 64

// outsizedQuantity reports a quantity that resource.ParseQuantity would
// spend seconds and gigabytes on: its arbitrary-precision arithmetic grows
// with the exponent ("1e-9999999" takes a second to parse, "8E8888888"
// three to compare with 1P). Pods write these values, and the plugin runs
// in every pod start.
func outsizedQuantity(v string) bool {
	if len(v) > maxQuantityLen {
		return true
	}
	i := strings.LastIndexAny(v, "eE")
	if i < 0 {
		return false
	}
	// "E" alone is the exa suffix and "Ei" exbi; a decimal exponent is
	// e/E and a signed number.
	exp := strings.TrimLeft(v[i+1:], "+-")
	return len(exp) > 2
}

// parseDelay reads a queueing-delay budget. Only a budget below the
// minimum is an error: one above the ceiling is clamped by the caller.
func parseDelay(field, v string) (time.Duration, error) {
	d, err := time.ParseDuration(strings.TrimSpace(v))
	if err != nil {
		return 0, invalid(field, fmt.Sprintf("%q", v), "not a Go duration (e.g. 10ms)")
	}
	if d < MinMaxQueueDelay {
		return 0, invalid(field, fmt.Sprintf("%q", v), fmt.Sprintf("must be at least %v", MinMaxQueueDelay))
	}
	return d, nil
}

// ParseDelay reads an operator's budget or ceiling: at least
// MinMaxQueueDelay, at most MaxMaxQueueDelay.
func ParseDelay(field, v string) (time.Duration, error) {
	d, err := parseDelay(field, v)
	if err == nil && d > MaxMaxQueueDelay {
		return 0, invalid(field, fmt.Sprintf("%q", v), fmt.Sprintf("must be at most %v", MaxMaxQueueDelay))
	}
	return d, err
}

// derive is deriveWithin the default ceilings, for an explicit burst (0 =
// none given).
func derive(rateBits, burstBits uint64, _ bool, delay time.Duration, mtu int, source string) *Params {
	return deriveWithin(DefaultCeilings, rateBits, burstBits, delay, mtu, source)
}

// deriveWithin computes burst and queue limit.
//
// The queue holds at most the delay budget's worth of data at the rate,
// never less than minQueueFrames frames, and never more than the ceiling.
// The token bucket (burst) is separate from it: by default burstWindow of
// the rate, at least two frames. A bucket that deep lets a sender that
// paused (TCP recovering from a drop, an ACK clock bunched up by the IFB)
// catch up instead of losing that time for good, and adds nothing to
// queueing delay: packets only wait in the queue. With a peak rate (see
// UsesPeak) TBF cuts every packet to two frames first, so the deep bucket
// never lets a 64 kB GSO packet meet the short queue whole. Without a peak
// rate (high rates) TBF sends a packet up to the bucket whole, so the
// queue holds at least one GSO packet (gsoQueue); it is never raised to
// the bucket itself, which a pod may ask to be large.
func deriveWithin(c Ceilings, rateBits, burstBits uint64, delay time.Duration, mtu int, source string) *Params {
	c = c.orDefaults()
	var clamps []Clamp
	frame := uint64(mtu + ethHeader)
	budget := bytesIn(rateBits, delay)
	limit := max(budget, minQueueFrames*frame)
	peak := UsesPeak(rateBits/8, min(limit, math.MaxUint32))
	if !peak {
		limit = max(limit, gsoQueue)
	}
	if limit > c.MaxQueueBytes {
		clamps = append(clamps, Clamp{Setting: SettingQueueLimit, Requested: limit, Applied: c.MaxQueueBytes})
		limit = c.MaxQueueBytes
	}
	// Two frames whatever the ceiling: a queue that cannot take a frame
	// drops every packet.
	limit = min(max(limit, 2*frame), math.MaxUint32)
	var burst uint64
	switch {
	case burstBits != 0:
		burst = max(ceilDiv(burstBits, 8), frame)
	case peak:
		burst = max(bytesIn(rateBits, burstWindow), 2*frame)
	default:
		burst = max(budget, 2*frame)
	}
	if burst > c.MaxBurstBytes {
		clamps = append(clamps, Clamp{Setting: SettingBurst, Requested: burst, Applied: c.MaxBurstBytes})
		burst = max(c.MaxBurstBytes, frame)
	}
	// The kernel keeps the bucket as time at the rate and dumps it in
	// 32-bit ticks: a deeper bucket would read back wrapped.
	burst = min(burst, MaxBurstBytesAt(rateBits/8))
	return &Params{RateBits: rateBits, BurstBytes: burst, LimitBytes: limit, MaxQueueDelay: delay, Source: source, Clamps: clamps}
}

// gsoQueue is the smallest queue without a peak rate: two 64 kB GSO
// packets with their per-segment headers.
const gsoQueue = 128 << 10

// MaxBurstBytesAt is the deepest bucket a direction may have at a byte
// rate: what the kernel can report back (maxBurstBytes, about 275 s of the
// rate) and 32 bits.
func MaxBurstBytesAt(rateBytes uint64) uint64 {
	return min(maxBurstBytes(rateBytes), math.MaxUint32)
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
