package shaping

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

// Annotation keys of guaranteed bandwidth. A request is the pod's
// guaranteed minimum per direction (bit/s); the kubernetes.io bandwidth
// annotations stay its limit. The priority orders who borrows idle
// capacity first.
const (
	AnnotationIngressRequest = "qoscni.io/ingress-bandwidth-request"
	AnnotationEgressRequest  = "qoscni.io/egress-bandwidth-request"
	AnnotationPriority       = "qoscni.io/bandwidth-priority"
)

// ErrBandwidthUnavailable is the CNI error code (plugin-specific range) of
// a pod whose request does not fit in what the node has left.
const ErrBandwidthUnavailable = 101

// Priority is a pod's place in the order of borrowing idle capacity. The
// values are HTB class priorities: a lower one borrows first.
type Priority uint8

const (
	PriorityHigh   Priority = 0
	PriorityNormal Priority = 1
	PriorityLow    Priority = 2
)

func (p Priority) String() string {
	switch p {
	case PriorityHigh:
		return "high"
	case PriorityNormal:
		return "normal"
	case PriorityLow:
		return "low"
	}
	return "Priority(" + strconv.Itoa(int(p)) + ")"
}

// ParsePriority reads a priority name, in any letter case. field names the
// input in the error (CNI error 7).
func ParsePriority(field, value string) (Priority, error) {
	switch strings.ToLower(strings.TrimSpace(value)) {
	case "high":
		return PriorityHigh, nil
	case "normal":
		return PriorityNormal, nil
	case "low":
		return PriorityLow, nil
	}
	return PriorityNormal, invalid(field, fmt.Sprintf("%q", value), "must be high, normal or low")
}

// Capacity is the node's bandwidth per direction (bit/s) that the
// hierarchy shares out; 0 leaves that direction without one.
type Capacity struct {
	IngressBits, EgressBits uint64
}

// Class is one pod's share of one direction's hierarchy.
type Class struct {
	// RequestBits is the guaranteed rate; 0 is best effort: the pod only
	// borrows what nobody with a request uses. A request above the node
	// capacity survives here (with CeilBits below it) for Admit to refuse.
	RequestBits uint64
	// CeilBits is what the pod may reach by borrowing: its limit, or the
	// capacity when it has none, never above the capacity.
	CeilBits uint64
	Priority Priority
	// BurstBytes is the bucket at the request rate (best effort: at
	// CeilBits), CburstBytes the one at CeilBits.
	BurstBytes, CburstBytes uint64
	// QueueBytes bounds the class's queue: the delay budget at the request
	// rate (best effort: at CeilBits).
	QueueBytes    uint64
	MaxQueueDelay time.Duration
	// Clamps lists the settings a ceiling cut down (nil: none).
	Clamps []Clamp
	// Claimed: the request is the pod's DRA grant, not its annotation.
	Claimed bool
}

// Guarantee is one pod's classes; a direction is nil where the node has
// no capacity for it.
type Guarantee struct {
	Ingress, Egress *Class
}

// Empty reports whether no direction has a hierarchy.
func (g Guarantee) Empty() bool { return g.Ingress == nil && g.Egress == nil }

// guaranteeDirection adds to direction what guarantees read.
type guaranteeDirection struct {
	direction
	requestAnno string
	capacity    func(Capacity) uint64
	limit       func(Plan) *Params
	granted     func(Granted) uint64
}

var (
	guaranteeIngress = guaranteeDirection{dirIngress, AnnotationIngressRequest,
		func(c Capacity) uint64 { return c.IngressBits }, func(p Plan) *Params { return p.Ingress },
		func(g Granted) uint64 { return g.IngressBits }}
	guaranteeEgress = guaranteeDirection{dirEgress, AnnotationEgressRequest,
		func(c Capacity) uint64 { return c.EgressBits }, func(p Plan) *Params { return p.Egress },
		func(g Granted) uint64 { return g.EgressBits }}
)

// ResolveGuarantee derives the pod's class in each direction the node has
// a capacity for. limits is what Resolve returned for the same inputs: a
// direction's limit is the class's ceiling. Request annotations of a
// direction without capacity are ignored; anything else that is wrong is
// a CNI error 7 naming its annotation. A request above the operator's
// Ceilings.MaxRequestBits is clamped and the clamp recorded. Whether the
// request fits beside the other pods' is Admit's question. The capacities
// and MaxRequestBits are 0 or rates of MinRateBits..MaxRateBits, as the
// config parser bounds them.
func ResolveGuarantee(in Inputs, limits Plan, capacity Capacity, mtu int) (Guarantee, error) {
	if capacity == (Capacity{}) {
		return Guarantee{}, nil
	}
	c := in.Ceilings.orDefaults()
	delay, clamps, err := resolveDelay(in, c)
	if err != nil {
		return Guarantee{}, err
	}
	prio := PriorityNormal
	if v, ok := in.Annotations[AnnotationPriority]; ok {
		if prio, err = ParsePriority("annotation "+AnnotationPriority, v); err != nil {
			return Guarantee{}, err
		}
	}
	var g Guarantee
	for _, d := range []struct {
		gd  guaranteeDirection
		out **Class
	}{{guaranteeIngress, &g.Ingress}, {guaranteeEgress, &g.Egress}} {
		cls, err := resolveClass(in, d.gd, limits, capacity, c, prio, delay, mtu)
		if err != nil {
			return Guarantee{}, err
		}
		if cls != nil && len(clamps) > 0 {
			cls.Clamps = append(slices.Clone(clamps), cls.Clamps...)
		}
		*d.out = cls
	}
	return g, nil
}

func resolveClass(in Inputs, d guaranteeDirection, limits Plan, capacity Capacity, c Ceilings,
	prio Priority, delay time.Duration, mtu int) (*Class, error) {
	capBits := d.capacity(capacity)
	if capBits == 0 {
		return nil, nil
	}
	ceil := capBits
	limit := d.limit(limits)
	if limit != nil {
		ceil = min(limit.RateBits, capBits)
	}
	var clamps []Clamp
	var request uint64
	claimed := false
	if in.Granted != nil && d.granted(*in.Granted) > 0 {
		// Placed by the scheduler: the request, whatever the annotation
		// says, and never above the ceiling it is the guarantee under (a
		// limit below it is raised to it, within the capacity).
		request = min(d.granted(*in.Granted), capBits)
		if c.MaxRequestBits != 0 && request > c.MaxRequestBits {
			clamps = append(clamps, Clamp{Setting: SettingRequest, Requested: request, Applied: c.MaxRequestBits})
			request = c.MaxRequestBits
		}
		ceil = max(ceil, request)
		claimed = true
	} else if v, ok := in.Annotations[d.requestAnno]; ok {
		r, err := parseQuantity("annotation "+d.requestAnno, v, true)
		if err != nil {
			return nil, err
		}
		// Checked before the operator's ceiling: a request above the
		// pod's own limit is a mistake in the pod, whatever the clamp.
		if limit != nil && r > limit.RateBits {
			return nil, invalid("annotation "+d.requestAnno, fmt.Sprintf("%q", v),
				fmt.Sprintf("request %s exceeds limit %s (%s)", FormatRate(r), FormatRate(limit.RateBits), d.limitField(limit.Source)))
		}
		if c.MaxRequestBits != 0 && r > c.MaxRequestBits {
			clamps = append(clamps, Clamp{Setting: SettingRequest, Requested: r, Applied: c.MaxRequestBits})
			r = c.MaxRequestBits
		}
		request = r
	}
	// The guaranteed part: bucket and queue at the request rate (at the
	// ceiling for best effort), by the policy of a pod's limit.
	base := deriveWithin(c, sizedAt(request, ceil), 0, delay, mtu, "")
	clamps = append(clamps, base.Clamps...)
	// The borrowed part: the bucket at the ceiling, with the explicit
	// burst that goes with the limit's source, as Resolve gives the limit;
	// without a limit, the pod's burst annotation.
	_, explicit, _, err := pickRate(in, d.direction)
	if err != nil {
		return nil, err
	}
	top := deriveWithin(c, ceil, explicit, delay, mtu, "")
	for _, cl := range top.Clamps {
		// Only the bucket of the ceiling derivation is used; its queue is
		// not, so neither is a clamp of it.
		if cl.Setting == SettingBurst {
			cl.Setting = SettingCburst
			clamps = append(clamps, cl)
		}
	}
	if len(clamps) == 0 {
		clamps = nil
	}
	return &Class{
		RequestBits: request, CeilBits: ceil, Priority: prio,
		BurstBytes: base.BurstBytes, CburstBytes: top.BurstBytes, QueueBytes: base.LimitBytes,
		MaxQueueDelay: delay, Clamps: clamps, Claimed: claimed,
	}, nil
}

// sizedAt is the rate a class's guaranteed part is sized at: the request,
// or the ceiling for best effort.
func sizedAt(request, ceil uint64) uint64 {
	if request == 0 {
		return ceil
	}
	return request
}

// limitField names where a direction's limit came from, as errors name it.
func (d direction) limitField(source string) string {
	switch source {
	case SourceRuntimeConfig:
		return "runtimeConfig.bandwidth." + d.rateField
	case SourceConfig:
		return d.rateField
	}
	return d.rateAnno
}

// Admit checks that a pod's request fits in a direction's node capacity
// beside what other pods already reserved. A best-effort pod (request 0)
// reserves nothing and always fits, also on a node reserved beyond its
// capacity (a capacity lowered under running pods). The refusal is a CNI
// error ErrBandwidthUnavailable with every number the operator needs.
func Admit(direction string, capacityBits, reservedBits, requestBits uint64) error {
	return admit(direction, capacityBits, reservedBits, requestBits, false)
}

// admit is Admit for a request from the pod's annotation or, claimed, from
// its DRA claims, which the error names instead.
func admit(direction string, capacityBits, reservedBits, requestBits uint64, claimed bool) error {
	if requestBits == 0 || (requestBits <= capacityBits && reservedBits <= capacityBits-requestBits) {
		return nil
	}
	where, hint := "", "lower the request, or schedule the pod on a node with bandwidth left"
	switch {
	case claimed:
		// The scheduler counted the claim against the node's
		// ResourceSlice: it and the capacity here disagree, or pods with
		// request annotations took what the slice says is free.
		where = " (its DRA claims)"
		hint = "the node's bandwidth ResourceSlice and its nodeCapacity disagree, or pods with request annotations hold what the scheduler counts as free"
	case direction == dirIngress.name:
		where = " (" + AnnotationIngressRequest + ")"
	case direction == dirEgress.name:
		where = " (" + AnnotationEgressRequest + ")"
	}
	return types.NewError(ErrBandwidthUnavailable,
		fmt.Sprintf("%s: node capacity %s, %s already reserved by other pods, this pod requests %s%s",
			direction, FormatRate(capacityBits), FormatRate(reservedBits), FormatRate(requestBits), where), hint)
}

// rateUnits are SI prefixes, as Kubernetes quantities and tc use them.
var rateUnits = []struct {
	prefix string
	size   uint64
}{
	{"E", 1e18}, {"P", 1e15}, {"T", 1e12}, {"G", 1e9}, {"M", 1e6}, {"k", 1e3},
}

// FormatRate writes a rate for people: "30Mbit/s", "1.5Gbit/s",
// "999bit/s". The value is exact (no rounding), so sums in a message add
// up: 20000400 bit/s is "20.0004Mbit/s".
func FormatRate(bits uint64) string {
	for _, u := range rateUnits {
		if bits < u.size {
			continue
		}
		s := strconv.FormatUint(bits/u.size, 10)
		if frac := bits % u.size; frac != 0 {
			digits := len(strconv.FormatUint(u.size, 10)) - 1
			s += "." + strings.TrimRight(fmt.Sprintf("%0*d", digits, frac), "0")
		}
		return s + u.prefix + "bit/s"
	}
	return strconv.FormatUint(bits, 10) + "bit/s"
}
