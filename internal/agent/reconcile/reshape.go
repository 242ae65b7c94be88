package reconcile

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/fault"
	"github.com/qoscni/qoscni/internal/grant"
	"github.com/qoscni/qoscni/internal/paths"
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
// and the plugin config defaults the record kept: its own pipeline, and
// its classes in the node hierarchy when the record has a node capacity.
// runtimeConfig.bandwidth is left out on purpose: the runtime derived it
// from the same annotations at ADD, so the live annotations are the truth
// now.
func resolve(rec *state.Record, pod Pod) (shaping.Plan, bool, error) {
	plan, _, ok, err := resolveAll(rec, pod, nil)
	return plan, ok, err
}

// resolveAll is resolve with the guarantee; granted is the pod's DRA
// grant (nil: none), which wins over its request annotations as at ADD.
func resolveAll(rec *state.Record, pod Pod, granted *shaping.Granted) (shaping.Plan, shaping.Guarantee, bool, error) {
	in := shaping.Inputs{Annotations: pod.Annotations, Granted: granted}
	var capacity shaping.Capacity
	if d := rec.ShapingDefaults; d != nil {
		in.Config = shaping.Rates{IngressRate: d.IngressRate, IngressBurst: d.IngressBurst, EgressRate: d.EgressRate, EgressBurst: d.EgressBurst}
		in.ConfigMaxQueueDelay = time.Duration(d.MaxQueueDelayNs)
		in.Ceilings = shaping.CeilingsFromRecord(d.Ceilings)
		capacity = shaping.CapacityFromRecord(d.NodeCapacity)
	} else if fromConfig(rec.Shaping) {
		// A record from before ShapingDefaults existed: its config-sourced
		// shaping cannot be re-derived, so leave it as it is.
		return shaping.Plan{}, shaping.Guarantee{}, false, nil
	}
	plan, g, err := shaping.ResolveAttachment(in, capacity, mtuOf(rec))
	return plan, g, true, err
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
	if k == AnnotationEffective {
		return false // the agent's own report, not an input
	}
	return k == shaping.AnnotationIngressRate || k == shaping.AnnotationEgressRate || strings.HasPrefix(k, "qoscni.io/") ||
		strings.HasPrefix(k, shaping.CalicoPrefix)
}

// granted reads the pod's DRA grant beside the registry, as the plugin
// does at ADD (nil: none, or no registry to find it by).
func (r *Reconciler) granted(pod Pod) (*shaping.Granted, error) {
	if r.cfg.StateRegistry == "" || pod.UID == "" {
		return nil, nil
	}
	t, err := grant.ForPod(paths.GrantDirOf(r.cfg.StateRegistry), pod.UID)
	if err != nil {
		return nil, err
	}
	r.noteOverride(pod, t)
	if t.Empty() {
		return nil, nil
	}
	return &shaping.Granted{IngressBits: t.IngressBits, EgressBits: t.EgressBits}, nil
}

// noteOverride reports, once per pod and message, a request annotation
// that the pod's DRA claims replace.
func (r *Reconciler) noteOverride(pod Pod, t grant.Total) {
	ref := podRef{pod.Namespace, pod.Name, pod.UID}
	var parts []string
	for _, d := range []struct {
		name string
		bits uint64
		key  string
	}{{"ingress", t.IngressBits, shaping.AnnotationIngressRequest}, {"egress", t.EgressBits, shaping.AnnotationEgressRequest}} {
		if v, ok := pod.Annotations[d.key]; ok && d.bits > 0 {
			parts = append(parts, fmt.Sprintf("%s %s instead of %s=%q", d.name, shaping.FormatRate(d.bits), d.key, v))
		}
	}
	if len(parts) == 0 {
		delete(r.overridden, ref)
		return
	}
	msg := "the pod's bandwidth claims (" + strings.Join(t.Claims, ", ") + ") set its guaranteed request: " + strings.Join(parts, "; ")
	if r.overridden[ref] == msg {
		return
	}
	r.overridden[ref] = msg
	r.log.Info("bandwidth claims replace a request annotation", "namespace", pod.Namespace, "pod", pod.Name, "message", msg)
	if r.cfg.Events != nil {
		r.cfg.Events.Warn(pod, ReasonClaimOverridesRequest, msg)
	}
}

// reshape makes one attachment follow its pod's annotations: its shaping,
// then its controls. A bad value keeps what the attachment has and is
// reported once per distinct message.
func (r *Reconciler) reshape(a attachment, pod Pod) outcome {
	s := r.reshapeShaping(a, pod)
	if s == outcomeGone {
		return s
	}
	return worse(s, r.reshapeControls(a, pod))
}

// worse is the outcome to report for two steps of one attachment.
func worse(a, b outcome) outcome {
	rank := map[outcome]int{outcomeNone: 0, outcomeInvalid: 1, outcomeApplied: 2, outcomeFailed: 3, outcomeGone: 4}
	if rank[b] > rank[a] {
		return b
	}
	return a
}

// reshapeShaping makes the attachment's shaping follow the annotations.
func (r *Reconciler) reshapeShaping(a attachment, pod Pod) outcome {
	rec := a.Record
	ref := podRef{pod.Namespace, pod.Name, pod.UID}
	granted, err := r.granted(pod)
	if err != nil {
		r.invalid(rec, pod, ref, err)
		return outcomeInvalid
	}
	plan, g, ok, err := resolveAll(rec, pod, granted)
	if err != nil {
		r.invalid(rec, pod, ref, err)
		return outcomeInvalid
	}
	if !ok {
		return outcomeNone
	}
	ifb := ifbOf(rec)
	if reflect.DeepEqual(shaping.RecordOf(plan, g, minorOf(rec), rec.HostVeth, ifb), rec.Shaping) {
		delete(r.bad, ref)
		return outcomeNone
	}
	var changes []string
	// Under the record's lock, so the record and the kernel move together
	// and a DEL that removed the record wins.
	err = a.store.Update(rec.Key(), func(cur *state.Record) error {
		minor := minorOf(cur)
		want := shaping.RecordOf(plan, g, minor, cur.HostVeth, ifb)
		if reflect.DeepEqual(want, cur.Shaping) {
			return errUnchanged
		}
		var err error
		changes, err = r.shaper.Apply(shaping.Desired{HostVeth: cur.HostVeth, IFB: ifb, MTU: cur.MTU, Plan: plan, HierEgress: g.Egress != nil})
		if err != nil {
			return err
		}
		if minor, err = r.rejoin(cur, g, minor); err != nil {
			return err
		}
		// Kernel changed, record not yet: the reliability tests kill the
		// agent here and between the shaping actions (internal/fault).
		fault.At("reshape", "applied")
		cur.Shaping = shaping.RecordOf(plan, g, minor, cur.HostVeth, ifb)
		return nil
	})
	if err == nil {
		fault.At("reshape", "state")
	}
	var cerr *types.Error
	if errors.As(err, &cerr) && cerr.Code == shaping.ErrBandwidthUnavailable {
		// The new request does not fit: the pod keeps what it has, and
		// the refusal is reported once, not at every look at the pod.
		r.invalid(rec, pod, ref, err)
		return outcomeInvalid
	}
	if err == nil || errors.Is(err, errUnchanged) {
		delete(r.bad, ref)
	}
	return r.updated(err, rec, pod, "reshaped", "changes", changes)
}

// updated reports how a reshape step's record update ended: what, with
// the detail key and value, is the success's log line.
func (r *Reconciler) updated(err error, rec *state.Record, pod Pod, what, key string, detail any) outcome {
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
	r.log.Info(what, "namespace", pod.Namespace, "pod", pod.Name, "container", rec.ContainerID, "ifname", rec.IfName, key, detail)
	return outcomeApplied
}

func minorOf(rec *state.Record) uint16 {
	if rec.Shaping == nil || rec.Shaping.Guarantee == nil {
		return 0
	}
	return rec.Shaping.Guarantee.Minor
}

// rejoin moves the attachment's classes in the node hierarchy to g (its
// request admitted against the others'), or takes them out when g is
// empty; it returns the minor the record keeps.
func (r *Reconciler) rejoin(rec *state.Record, g shaping.Guarantee, minor uint16) (uint16, error) {
	if g.Empty() && minor == 0 {
		return 0, nil
	}
	l, err := shaping.LockHierarchy(r.hierarchyLock())
	if err != nil {
		return minor, err
	}
	defer l.Unlock()
	if g.Empty() {
		return 0, r.shaper.LeaveNode(minor, rec.HostVeth, rec.Addrs())
	}
	var capacity shaping.Capacity
	if rec.ShapingDefaults != nil {
		capacity = shaping.CapacityFromRecord(rec.ShapingDefaults.NodeCapacity)
	}
	return r.shaper.JoinNode(capacity, g, minor, rec.HostVeth, rec.Addrs())
}

// hierarchyLock is the node hierarchy's lock, beside the registry the
// plugin writes (paths.HierarchyLockOf).
func (r *Reconciler) hierarchyLock() string {
	if r.cfg.StateRegistry == "" {
		return "" // no registry, no lock: a test's own node
	}
	return paths.HierarchyLockOf(r.cfg.StateRegistry)
}

func (r *Reconciler) invalid(rec *state.Record, pod Pod, ref podRef, err error) {
	r.report(r.bad, rec, pod, ref, "qoscni keeps the current shaping: "+err.Error(), err)
}

// report sends an invalid-annotation message once per pod and message:
// seen is the step's memory (shaping's and controls' are apart, so each
// step's valid pass does not forget the other's bad value).
func (r *Reconciler) report(seen map[podRef]string, rec *state.Record, pod Pod, ref podRef, msg string, err error) {
	if seen[ref] == msg {
		return
	}
	seen[ref] = msg
	r.m.reshapes.WithLabelValues("invalid").Inc()
	r.log.Warn("invalid annotation; kept what the pod has", "namespace", pod.Namespace, "pod", pod.Name,
		"container", rec.ContainerID, "ifname", rec.IfName, "err", err)
	if r.cfg.Events != nil {
		r.cfg.Events.Warn(pod, ReasonInvalidAnnotation, msg)
	}
}

// reshapeControls makes the attachment's packet-rate, connection and DSCP
// controls follow the annotations, under the record's lock like shaping.
func (r *Reconciler) reshapeControls(a attachment, pod Pod) outcome {
	rec := a.Record
	ref := podRef{pod.Namespace, pod.Name, pod.UID}
	want, err := shaping.ParseControls(pod.Annotations)
	if err != nil {
		r.report(r.badControls, rec, pod, ref, "qoscni keeps the current controls: "+err.Error(), err)
		return outcomeInvalid
	}
	delete(r.badControls, ref)
	if reflect.DeepEqual(want, rec.Controls) {
		return outcomeNone
	}
	err = a.store.Update(rec.Key(), func(cur *state.Record) error {
		if reflect.DeepEqual(want, cur.Controls) {
			return errUnchanged
		}
		ips, err := controls.IPsOf(cur)
		if err != nil {
			return err
		}
		m, err := controls.New(r.cfg.NetnsFd)
		if err != nil {
			return err
		}
		defer m.Close()
		if err := m.Set(controls.OwnerOf(cur), ips, want); err != nil {
			return err
		}
		cur.Controls = want
		return nil
	})
	return r.updated(err, rec, pod, "controls changed", "controls", describeControls(want))
}

// describeControls is a log line's view of c.
func describeControls(c *state.Controls) string {
	if c.Empty() {
		return "none"
	}
	var parts []string
	for _, d := range []struct {
		name string
		d    *state.ControlDirection
	}{{"ingress", c.Ingress}, {"egress", c.Egress}} {
		if d.d == nil {
			continue
		}
		if d.d.PacketRate != 0 {
			parts = append(parts, fmt.Sprintf("%s %d packets/s burst %d", d.name, d.d.PacketRate, d.d.PacketBurst))
		}
		if d.d.MaxConnections != 0 {
			parts = append(parts, fmt.Sprintf("%s at most %d connections", d.name, d.d.MaxConnections))
		}
	}
	if c.DSCP != nil {
		parts = append(parts, fmt.Sprintf("DSCP %d", *c.DSCP))
	}
	return strings.Join(parts, ", ")
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
