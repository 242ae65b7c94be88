package shaping

import (
	"time"

	"github.com/qoscni/qoscni/state"
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
