package plugin

import (
	"log/slog"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// shapingPlan resolves the attachment's shaping from the pod annotations,
// runtimeConfig.bandwidth and the plugin config, before anything changes,
// so bad input is refused with nothing done.
func shapingPlan(conf *netconf.NetConf, mtu int) (shaping.Plan, error) {
	in := shaping.Inputs{
		Annotations: conf.RuntimeConfig.PodAnnotations,
		Config: shaping.Rates{
			IngressRate: conf.IngressRate, IngressBurst: conf.IngressBurst,
			EgressRate: conf.EgressRate, EgressBurst: conf.EgressBurst,
		},
		ConfigMaxQueueDelay: conf.QueueDelay,
		Ceilings:            conf.ShapingCeilings,
	}
	if bw := conf.RuntimeConfig.Bandwidth; bw != nil {
		in.Runtime = &shaping.Rates{
			IngressRate: bw.IngressRate, IngressBurst: bw.IngressBurst,
			EgressRate: bw.EgressRate, EgressBurst: bw.EgressBurst,
		}
	}
	return shaping.Resolve(in, mtu)
}

// shapingDefaults keeps the config's shaping inputs in the record for the
// agent's live reshaping (nil when the config has none).
func shapingDefaults(conf *netconf.NetConf) *state.ShapingDefaults {
	d := &state.ShapingDefaults{
		IngressRate: conf.IngressRate, IngressBurst: conf.IngressBurst,
		EgressRate: conf.EgressRate, EgressBurst: conf.EgressBurst,
		MaxQueueDelayNs: int64(conf.QueueDelay),
		Ceilings:        shaping.CeilingsToRecord(conf.ShapingCeilings),
	}
	if *d == (state.ShapingDefaults{}) {
		return nil
	}
	return d
}

// logClamps reports the settings a ceiling cut down: the pod asked for
// more than the operator allows, and got the ceiling.
func logClamps(log *slog.Logger, containerID, ifName string, plan shaping.Plan) {
	for _, d := range []struct {
		name string
		p    *shaping.Params
	}{{"ingress", plan.Ingress}, {"egress", plan.Egress}} {
		if d.p == nil {
			continue
		}
		for _, c := range d.p.Clamps {
			log.Warn("shaping clamped to the config's ceiling", "container", containerID, "ifname", ifName,
				"direction", d.name, "setting", c.Setting, "requested", c.Requested, "applied", c.Applied, "what", c.String())
		}
	}
}
