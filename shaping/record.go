package shaping

import (
	"time"

	"github.com/qoscni/qoscni/internal/state"
)

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
	return &state.Ceilings{MaxQueueDelayNs: int64(c.MaxQueueDelay), MaxBurstBits: c.MaxBurstBytes * 8, MaxQueueBytes: c.MaxQueueBytes}
}

// CeilingsFromRecord is the inverse of CeilingsToRecord.
func CeilingsFromRecord(c *state.Ceilings) Ceilings {
	if c == nil {
		return Ceilings{}
	}
	return Ceilings{MaxQueueDelay: time.Duration(c.MaxQueueDelayNs), MaxBurstBytes: c.MaxBurstBits / 8, MaxQueueBytes: c.MaxQueueBytes}
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
