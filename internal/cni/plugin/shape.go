package plugin

import (
	"errors"
	"log/slog"
	"net"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/grant"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// shapingPlan resolves the attachment's shaping from the pod annotations,
// runtimeConfig.bandwidth and the plugin config, before anything changes,
// so bad input is refused with nothing done.
func (p *Plugin) shapingPlan(conf *netconf.NetConf, pod netconf.PodArgs, mtu int) (shaping.Plan, shaping.Guarantee, error) {
	in := shapingInputs(conf)
	if conf.Capacity != (shaping.Capacity{}) {
		g, err := p.granted(pod)
		if err != nil {
			return shaping.Plan{}, shaping.Guarantee{}, err
		}
		in.Granted = g
	}
	// A direction with a node capacity is shaped by the node hierarchy
	// (the limit is its class's ceil), not by a pipeline of its own.
	return shaping.ResolveAttachment(in, conf.Capacity, mtu)
}

func shapingInputs(conf *netconf.NetConf) shaping.Inputs {
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
	return in
}

// granted reads the bandwidth the scheduler placed for the pod (its DRA
// claims, which the kubelet prepared before the sandbox, so before ADD),
// nil for none. A grant that cannot be read fails ADD: the pod's
// guarantee would otherwise be silently lost.
func (p *Plugin) granted(pod netconf.PodArgs) (*shaping.Granted, error) {
	if p.StateRegistry == "" || pod.UID == "" {
		return nil, nil
	}
	t, err := grant.ForPod(paths.GrantDirOf(p.StateRegistry), pod.UID)
	if err != nil {
		return nil, types.NewError(types.ErrInternal, err.Error(), "")
	}
	if t.Empty() {
		return nil, nil
	}
	p.Log.Info("bandwidth request from DRA claims", "pod", pod.Namespace+"/"+pod.Name, "claims", t.Claims,
		"ingressBits", t.IngressBits, "egressBits", t.EgressBits)
	return &shaping.Granted{IngressBits: t.IngressBits, EgressBits: t.EgressBits}, nil
}

// hierarchyLock is the node hierarchy's lock file, beside the registry.
func (p *Plugin) hierarchyLock() string {
	if p.StateRegistry == "" {
		return "" // no registry, no lock: a test's own node
	}
	return paths.HierarchyLockOf(p.StateRegistry)
}

// joinHierarchy admits the pod and puts it in the node hierarchy under the
// node's lock; it returns the pod's class minor and the undo.
func (p *Plugin) joinHierarchy(g shaping.Guarantee, capacity shaping.Capacity, hostVeth string, ips []net.IP) (uint16, func() error, error) {
	l, err := shaping.LockHierarchy(p.hierarchyLock())
	if err != nil {
		return 0, nil, err
	}
	defer l.Unlock()
	sh, err := shaping.Open(-1)
	if err != nil {
		return 0, nil, err
	}
	defer sh.Close()
	minor, err := sh.JoinNode(capacity, g, 0, hostVeth, ips)
	undo := func() error {
		l, err := shaping.LockHierarchy(p.hierarchyLock())
		if err != nil {
			return err
		}
		defer l.Unlock()
		sh, err := shaping.Open(-1)
		if err != nil {
			return err
		}
		defer sh.Close()
		return sh.LeaveNode(minor, hostVeth, ips)
	}
	if err != nil {
		if minor != 0 {
			// Joined, but the best-effort share was not updated: leave.
			return 0, nil, errors.Join(err, undo())
		}
		return 0, nil, err
	}
	return minor, undo, nil
}

// shapingDefaults keeps the config's shaping inputs in the record for the
// agent's live reshaping (nil when the config has none).
func shapingDefaults(conf *netconf.NetConf) *state.ShapingDefaults {
	d := &state.ShapingDefaults{
		IngressRate: conf.IngressRate, IngressBurst: conf.IngressBurst,
		EgressRate: conf.EgressRate, EgressBurst: conf.EgressBurst,
		MaxQueueDelayNs: int64(conf.QueueDelay),
		Ceilings:        shaping.CeilingsToRecord(conf.ShapingCeilings),
		NodeCapacity:    shaping.CapacityToRecord(conf.Capacity),
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
