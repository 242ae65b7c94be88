package shaping

import (
	"time"

	"github.com/qoscni/qoscni/internal/state"
)

// RecordOf is the record's shaping: the pod's own pipeline (plan) and its
// place in the node hierarchy (g, in class minor).
func RecordOf(plan Plan, g Guarantee, minor uint16, hostVeth, ifb string) *state.Shaping {
	rec := ToRecord(plan, hostVeth, ifb)
	if g.Empty() {
		return rec
	}
	if rec == nil {
		rec = &state.Shaping{}
	}
	rec.Guarantee = GuaranteeToRecord(g, minor)
	return rec
}

// ToRecord is the plan as the state record keeps it.
func ToRecord(p Plan, hostVeth, ifb string) *state.Shaping {
	if p.Empty() {
		return nil
	}
	out := &state.Shaping{}
	if p.Ingress != nil {
		out.Ingress = toDirection(p.Ingress, hostVeth)
	}
	if p.Egress != nil {
		out.Egress = toDirection(p.Egress, ifb)
		out.IFB = ifb
	}
	return out
}

func toDirection(p *Params, dev string) *state.Direction {
	return &state.Direction{
		Device:          dev,
		RateBits:        p.RateBits,
		BurstBits:       p.BurstBytes * 8,
		LimitBytes:      p.LimitBytes,
		MaxQueueDelayNs: int64(p.MaxQueueDelay),
		Source:          p.Source,
		Clamped:         toClamps(p.Clamps),
		PeakBits:        p.PeakBits,
		MinBurstBytes:   p.MinBurstBytes,
	}
}

func toClamps(cs []Clamp) []state.Clamp {
	var out []state.Clamp
	for _, c := range cs {
		out = append(out, state.Clamp{Setting: c.Setting, Requested: c.Requested, Applied: c.Applied})
	}
	return out
}

// CeilingsToRecord is the ceilings as the record keeps them; nil for the
// defaults, so records of configs that set none stay as they were.
func CeilingsToRecord(c Ceilings) *state.Ceilings {
	if c == (Ceilings{}) {
		return nil
	}
	return &state.Ceilings{MaxQueueDelayNs: int64(c.MaxQueueDelay), MaxBurstBits: c.MaxBurstBytes * 8, MaxQueueBytes: c.MaxQueueBytes,
		MaxRequestBits: c.MaxRequestBits}
}

// CeilingsFromRecord is the inverse of CeilingsToRecord.
func CeilingsFromRecord(c *state.Ceilings) Ceilings {
	if c == nil {
		return Ceilings{}
	}
	return Ceilings{MaxQueueDelay: time.Duration(c.MaxQueueDelayNs), MaxBurstBytes: c.MaxBurstBits / 8, MaxQueueBytes: c.MaxQueueBytes,
		MaxRequestBits: c.MaxRequestBits}
}

// CapacityToRecord is the node capacity as the record's shaping defaults
// keep it; nil when guarantees are off.
func CapacityToRecord(c Capacity) *state.NodeCapacity {
	if c == (Capacity{}) {
		return nil
	}
	return &state.NodeCapacity{IngressBits: c.IngressBits, EgressBits: c.EgressBits}
}

// CapacityFromRecord is the inverse of CapacityToRecord.
func CapacityFromRecord(c *state.NodeCapacity) Capacity {
	if c == nil {
		return Capacity{}
	}
	return Capacity{IngressBits: c.IngressBits, EgressBits: c.EgressBits}
}

// GuaranteeToRecord is the guarantee as the record keeps it, with the
// pod's class minor; nil when no direction has a class.
func GuaranteeToRecord(g Guarantee, minor uint16) *state.Guarantee {
	if g.Empty() {
		return nil
	}
	return &state.Guarantee{Minor: minor, Ingress: classToRecord(g.Ingress), Egress: classToRecord(g.Egress)}
}

func classToRecord(c *Class) *state.GuaranteeDirection {
	if c == nil {
		return nil
	}
	return &state.GuaranteeDirection{
		RequestBits: c.RequestBits, CeilBits: c.CeilBits, Priority: c.Priority.String(),
		BurstBytes: c.BurstBytes, CburstBytes: c.CburstBytes, QueueBytes: c.QueueBytes,
		MaxQueueDelayNs: int64(c.MaxQueueDelay), Clamped: toClamps(c.Clamps),
	}
}

// GuaranteeFromRecord is the inverse of GuaranteeToRecord: the classes and
// the minor (zero values for nil). A priority the record does not name
// (only a hand-edited record has one) reads as normal, the default.
func GuaranteeFromRecord(g *state.Guarantee) (Guarantee, uint16) {
	if g == nil {
		return Guarantee{}, 0
	}
	return Guarantee{Ingress: classFromRecord(g.Ingress), Egress: classFromRecord(g.Egress)}, g.Minor
}

func classFromRecord(d *state.GuaranteeDirection) *Class {
	if d == nil {
		return nil
	}
	prio, err := ParsePriority("priority", d.Priority)
	if err != nil {
		prio = PriorityNormal
	}
	return &Class{
		RequestBits: d.RequestBits, CeilBits: d.CeilBits, Priority: prio,
		BurstBytes: d.BurstBytes, CburstBytes: d.CburstBytes, QueueBytes: d.QueueBytes,
		MaxQueueDelay: time.Duration(d.MaxQueueDelayNs), Clamps: fromClamps(d.Clamped),
	}
}

func fromDirection(d *state.Direction) *Params {
	if d == nil {
		return nil
	}
	return &Params{
		RateBits:      d.RateBits,
		BurstBytes:    d.BurstBits / 8,
		LimitBytes:    d.LimitBytes,
		MaxQueueDelay: time.Duration(d.MaxQueueDelayNs),
		Source:        d.Source,
		Clamps:        fromClamps(d.Clamped),
		PeakBits:      d.PeakBits,
		MinBurstBytes: d.MinBurstBytes,
	}
}

// FromRecord is the pipeline a state record asks for. The IFB name is
// derived by the caller when the record shapes no egress.
func FromRecord(rec *state.Record, ifb string) Desired {
	d := Desired{HostVeth: rec.HostVeth, IFB: ifb, MTU: rec.MTU}
	if rec.Shaping != nil {
		d.Plan.Ingress = fromDirection(rec.Shaping.Ingress)
		d.Plan.Egress = fromDirection(rec.Shaping.Egress)
		if rec.Shaping.IFB != "" {
			d.IFB = rec.Shaping.IFB
		}
		d.HierEgress = rec.Shaping.Guarantee != nil && rec.Shaping.Guarantee.Egress != nil
	}
	return d
}

func fromClamps(cs []state.Clamp) []Clamp {
	var out []Clamp
	for _, c := range cs {
		out = append(out, Clamp{Setting: c.Setting, Requested: c.Requested, Applied: c.Applied})
	}
	return out
}
