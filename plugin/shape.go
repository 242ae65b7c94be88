package plugin

import (
	"github.com/qoscni/qoscni/netconf"
	"github.com/qoscni/qoscni/shaping"
	"github.com/qoscni/qoscni/state"
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
		ConfigMaxQueueDelay: conf.MaxQueueDelay,
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
		MaxQueueDelay: conf.MaxQueueDelay,
	}
	if *d == (state.ShapingDefaults{}) {
		return nil
	}
	return d
}
