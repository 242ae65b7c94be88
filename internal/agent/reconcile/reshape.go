package reconcile

import (
	"errors"
	"reflect"
	"strings"
	"time"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/fault"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// defaultMTU stands in for a record written without one.
const defaultMTU = 1500

func mtuOf(rec *state.Record) int {
	if rec.MTU > 0 {
		return rec.MTU
	}
	return defaultMTU
}

// ifbOf is the attachment's IFB name, as the plugin's DEL derives it.
func ifbOf(rec *state.Record) string {
	if rec.Shaping != nil && rec.Shaping.IFB != "" {
		return rec.Shaping.IFB
	}
	return podnet.IFBName(rec.ContainerID, rec.IfName)
}

// resolve re-derives the attachment's shaping from the pod's annotations
// and the plugin config defaults the record kept. runtimeConfig.bandwidth
// is left out on purpose: the runtime derived it from the same annotations
// at ADD, so the live annotations are the truth now.
func resolve(rec *state.Record, pod Pod) (shaping.Plan, bool, error) {
	in := shaping.Inputs{Annotations: pod.Annotations}
	if d := rec.ShapingDefaults; d != nil {
		in.Config = shaping.Rates{IngressRate: d.IngressRate, IngressBurst: d.IngressBurst, EgressRate: d.EgressRate, EgressBurst: d.EgressBurst}
		in.ConfigMaxQueueDelay = time.Duration(d.MaxQueueDelayNs)
		in.Ceilings = shaping.CeilingsFromRecord(d.Ceilings)
	} else if fromConfig(rec.Shaping) {
		// A record from before ShapingDefaults existed: its config-sourced
		// shaping cannot be re-derived, so leave it as it is.
		return shaping.Plan{}, false, nil
	}
	plan, err := shaping.Resolve(in, mtuOf(rec))
	return plan, true, err
}

func fromConfig(s *state.Shaping) bool {
	if s == nil {
		return false
	}
	return (s.Ingress != nil && s.Ingress.Source == shaping.SourceConfig) || (s.Egress != nil && s.Egress.Source == shaping.SourceConfig)
}

// ShapingAnnotationsEqual reports whether a and b agree on every key that
// can change a pod's shaping (the watcher's filter for pod updates, which
// mostly carry status changes).
func ShapingAnnotationsEqual(a, b map[string]string) bool {
	return shapingSubset(a, b) && shapingSubset(b, a)
}

func shapingSubset(a, b map[string]string) bool {
	for k, v := range a {
		if !isShapingKey(k) {
			continue
		}
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

func isShapingKey(k string) bool {
	return k == shaping.AnnotationIngressRate || k == shaping.AnnotationEgressRate || strings.HasPrefix(k, "qoscni.io/")
}

// reshape makes one attachment follow its pod's annotations. A bad value
// keeps the current shaping and is reported once per distinct message.
func (r *Reconciler) reshape(a attachment, pod Pod) outcome {
	rec := a.Record
	plan, ok, err := resolve(rec, pod)
	ref := podRef{pod.Namespace, pod.Name, pod.UID}
	if err != nil {
		r.invalid(rec, pod, ref, err)
		return outcomeInvalid
	}
	if !ok {
		return outcomeNone
	}
	delete(r.bad, ref)
	ifb := ifbOf(rec)
	if reflect.DeepEqual(shaping.ToRecord(plan, rec.HostVeth, ifb), rec.Shaping) {
		return outcomeNone
	}
	var changes []string
	// Under the record's lock, so the record and the kernel move together
	// and a DEL that removed the record wins.
	err = a.store.Update(rec.Key(), func(cur *state.Record) error {
		want := shaping.ToRecord(plan, cur.HostVeth, ifb)
		if reflect.DeepEqual(want, cur.Shaping) {
			return errUnchanged
		}
		var err error
		changes, err = r.shaper.Apply(shaping.Desired{HostVeth: cur.HostVeth, IFB: ifb, MTU: cur.MTU, Plan: plan})
		if err != nil {
			return err
		}
		// Kernel changed, record not yet: the reliability tests kill the
		// agent here and between the shaping actions (internal/fault).
		fault.At("reshape", "applied")
		cur.Shaping = want
		return nil
	})
	if err == nil {
		fault.At("reshape", "state")
	}
	switch {
	case errors.Is(err, errUnchanged):
		return outcomeNone
	case errors.Is(err, state.ErrNoRecord):
		return outcomeGone
	case err != nil:
		r.m.reshapes.WithLabelValues("failed").Inc()
		r.m.errors.WithLabelValues("reshape").Inc()
		r.log.Error("reshape", "namespace", pod.Namespace, "pod", pod.Name, "container", rec.ContainerID, "ifname", rec.IfName, "err", err)
		return outcomeFailed
	}
	r.m.reshapes.WithLabelValues("applied").Inc()
	r.log.Info("reshaped", "namespace", pod.Namespace, "pod", pod.Name, "container", rec.ContainerID, "ifname", rec.IfName, "changes", changes)
	return outcomeApplied
}

func (r *Reconciler) invalid(rec *state.Record, pod Pod, ref podRef, err error) {
	msg := "qoscni keeps the current shaping: " + err.Error()
	if r.bad[ref] == msg {
		return
	}
	r.bad[ref] = msg
	r.m.reshapes.WithLabelValues("invalid").Inc()
	r.log.Warn("invalid bandwidth annotation; shaping unchanged", "namespace", pod.Namespace, "pod", pod.Name,
		"container", rec.ContainerID, "ifname", rec.IfName, "err", err)
	if r.cfg.Events != nil {
		r.cfg.Events.Warn(pod, ReasonInvalidAnnotation, msg)
	}
}

// repair makes the kernel match the record again.
func (r *Reconciler) repair(rec *state.Record) outcome {
	changes, err := r.shaper.Apply(shaping.FromRecord(rec, ifbOf(rec)))
	if err != nil {
		if ok, lerr := r.linkExists(rec.HostVeth); lerr == nil && !ok {
			// A DEL in flight or a pod GC will take next: not drift.
			r.log.Debug("host veth missing; not repairing", "container", rec.ContainerID, "ifname", rec.IfName, "veth", rec.HostVeth)
			return outcomeNone
		}
		r.m.errors.WithLabelValues("repair").Inc()
		r.log.Error("repair shaping", "namespace", rec.Pod.Namespace, "pod", rec.Pod.Name, "container", rec.ContainerID, "ifname", rec.IfName, "err", err)
		return outcomeFailed
	}
	if len(changes) == 0 {
		return outcomeNone
	}
	r.m.repairs.WithLabelValues("shaping").Inc()
	r.log.Warn("repaired shaping that drifted from the record", "namespace", rec.Pod.Namespace, "pod", rec.Pod.Name,
		"container", rec.ContainerID, "ifname", rec.IfName, "changes", changes)
	return outcomeApplied
}
