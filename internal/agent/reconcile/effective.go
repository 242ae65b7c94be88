package reconcile

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// AnnotationEffective is the pod annotation the agent keeps current with
// what the pod's shaping and controls became on its node, so that
// `kubectl describe pod` answers whether a limit is enforced.
const AnnotationEffective = "qoscni.io/effective-shaping"

// ReasonShapingApplied is the Normal Event reason when a pod's effective
// shaping is first known on its node or changes; ReasonShapingNotEnforced
// the Warning one when the agent found it missing from the kernel and
// could not restore it.
const (
	ReasonShapingApplied     = "ShapingApplied"
	ReasonShapingNotEnforced = "ShapingNotEnforced"
)

// Effective is the value of AnnotationEffective: per pod interface, what
// the kernel was given.
type Effective struct {
	Node       string                        `json:"node"`
	Interfaces map[string]EffectiveInterface `json:"interfaces"`
}

// EffectiveInterface is one attachment's effective shaping.
type EffectiveInterface struct {
	Ingress  *EffectiveDirection `json:"ingress,omitempty"`
	Egress   *EffectiveDirection `json:"egress,omitempty"`
	Controls *state.Controls     `json:"controls,omitempty"`
	// InKernel is false when the agent's last comparison found the kernel
	// different and could not repair it.
	InKernel bool `json:"inKernel"`
	// Kernel names the objects that enforce it on the node.
	Kernel *EffectiveKernel `json:"kernel,omitempty"`
}

// EffectiveKernel names the tc and nftables objects of an attachment.
type EffectiveKernel struct {
	TC       []string `json:"tc,omitempty"`
	NFTables []string `json:"nftables,omitempty"`
}

// kernelOf lists the objects the record's shaping and controls live in.
func kernelOf(rec *state.Record) *EffectiveKernel {
	k := &EffectiveKernel{}
	if s := rec.Shaping; s != nil {
		if s.Ingress != nil {
			k.TC = append(k.TC, "ingress: root qdisc 1: of "+s.Ingress.Device)
		}
		if s.Egress != nil {
			k.TC = append(k.TC, "egress: root qdisc 1: of "+s.Egress.Device+" (redirected from the ingress hook of "+rec.HostVeth+")")
		}
		if g := s.Guarantee; g != nil {
			if g.Ingress != nil {
				k.TC = append(k.TC, fmt.Sprintf("ingress: class 1:%x of %s", g.Minor, shaping.HierarchyIngressIFB))
			}
			if g.Egress != nil {
				k.TC = append(k.TC, fmt.Sprintf("egress: class 1:%x of %s", g.Minor, shaping.HierarchyEgressIFB))
			}
		}
	}
	if !rec.Controls.Empty() {
		if ips, err := controls.IPsOf(rec); err == nil {
			for _, e := range controls.Elements(ips, rec.Controls) {
				k.NFTables = append(k.NFTables, "table inet qoscni "+e)
			}
		}
	}
	if len(k.TC) == 0 && len(k.NFTables) == 0 {
		return nil
	}
	return k
}

// EffectiveDirection is one direction's limit, guarantee and bucket.
type EffectiveDirection struct {
	// Limit is the rate the pod cannot exceed ("" with a guarantee but no
	// limit of its own: it may borrow up to Ceil).
	Limit string `json:"limit,omitempty"`
	// Source is the input the limit came from (annotation, runtimeConfig,
	// config).
	Source     string `json:"source,omitempty"`
	BurstBytes uint64 `json:"burstBytes,omitempty"`
	QueueBytes uint64 `json:"queueBytes,omitempty"`
	Peak       string `json:"peak,omitempty"`
	// Request, Ceil and Priority are the pod's class in the node's
	// guarantee hierarchy (Request "0" for best effort).
	Request  string `json:"request,omitempty"`
	Ceil     string `json:"ceil,omitempty"`
	Priority string `json:"priority,omitempty"`
	// Clamped lists the settings a node ceiling cut down, as
	// "setting: asked -> got".
	Clamped []string `json:"clamped,omitempty"`
}

// effectiveOf is a record's effective shaping (ok false: nothing shaped or
// controlled).
func effectiveOf(rec *state.Record, inKernel bool) (EffectiveInterface, bool) {
	out := EffectiveInterface{Controls: rec.Controls, InKernel: inKernel, Kernel: kernelOf(rec)}
	if rec.Controls.Empty() {
		out.Controls = nil
	}
	if s := rec.Shaping; s != nil {
		var gIn, gEg *state.GuaranteeDirection
		if s.Guarantee != nil {
			gIn, gEg = s.Guarantee.Ingress, s.Guarantee.Egress
		}
		out.Ingress = effectiveDirection(s.Ingress, gIn)
		out.Egress = effectiveDirection(s.Egress, gEg)
	}
	return out, out.Ingress != nil || out.Egress != nil || out.Controls != nil
}

func effectiveDirection(d *state.Direction, g *state.GuaranteeDirection) *EffectiveDirection {
	if d == nil && g == nil {
		return nil
	}
	out := &EffectiveDirection{}
	if d != nil {
		out.Limit, out.Source = shaping.FormatRate(d.RateBits), d.Source
		out.BurstBytes, out.QueueBytes = d.BurstBits/8, d.LimitBytes
		if d.PeakBits != 0 {
			out.Peak = shaping.FormatRate(d.PeakBits)
		}
		for _, c := range d.Clamped {
			out.Clamped = append(out.Clamped, clampText(c))
		}
	}
	if g != nil {
		out.Request, out.Ceil, out.Priority = shaping.FormatRate(g.RequestBits), shaping.FormatRate(g.CeilBits), g.Priority
		if g.RequestBits == 0 {
			out.Request = "0"
		}
		if d == nil {
			out.BurstBytes, out.QueueBytes = g.BurstBytes, g.QueueBytes
		}
		for _, c := range g.Clamped {
			out.Clamped = append(out.Clamped, clampText(c))
		}
	}
	return out
}

func clampText(c state.Clamp) string {
	switch c.Setting {
	case state.ClampQueueDelay:
		return fmt.Sprintf("%s: %dns -> %dns", c.Setting, c.Requested, c.Applied)
	case shaping.SettingRequest:
		return fmt.Sprintf("%s: %s -> %s", c.Setting, shaping.FormatRate(c.Requested), shaping.FormatRate(c.Applied))
	}
	return fmt.Sprintf("%s: %dB -> %dB", c.Setting, c.Requested, c.Applied)
}

// enforced reports whether every interface is in the kernel.
func (e Effective) enforced() bool {
	for _, i := range e.Interfaces {
		if !i.InKernel {
			return false
		}
	}
	return true
}

// encode is the annotation's value: compact JSON, interfaces in key
// order (encoding/json sorts map keys), so equal states compare equal.
func (e Effective) encode() string {
	b, err := json.Marshal(e)
	if err != nil {
		return ""
	}
	return string(b)
}

// summary is the Event message: one clause per interface and direction.
func (e Effective) summary() string {
	var parts []string
	for _, ifname := range slices.Sorted(maps.Keys(e.Interfaces)) {
		i := e.Interfaces[ifname]
		for _, d := range []struct {
			name string
			d    *EffectiveDirection
		}{{"ingress", i.Ingress}, {"egress", i.Egress}} {
			if d.d == nil {
				continue
			}
			var s []string
			if d.d.Limit != "" {
				s = append(s, "limit "+d.d.Limit+" ("+d.d.Source+")")
			}
			if d.d.Request != "" {
				s = append(s, "request "+d.d.Request+" up to "+d.d.Ceil)
			}
			if len(d.d.Clamped) > 0 {
				s = append(s, "clamped "+strings.Join(d.d.Clamped, ", "))
			}
			parts = append(parts, ifname+" "+d.name+": "+strings.Join(s, ", "))
		}
		if i.Controls != nil {
			parts = append(parts, ifname+": "+describeControls(i.Controls))
		}
		if !i.InKernel {
			parts = append(parts, ifname+": NOT in the kernel (repair failed, see the agent's log)")
		}
	}
	return "on " + e.Node + ": " + strings.Join(parts, "; ")
}

// podEffective gathers, over one pass or drain, each pod's attachments.
type podEffective struct {
	pod Pod
	eff Effective
	// shaped: at least one attachment has shaping or controls.
	shaped bool
}

// note adds an attachment's effective shaping to its pod's. Whether it is
// in the kernel comes from o: a reshape or repair that failed says no, one
// that applied says yes, and a step that did not compare with the kernel
// (a reshape with nothing to change) keeps what the last pass found.
func (r *Reconciler) note(acc map[podRef]*podEffective, rec *state.Record, pod Pod, o outcome, compared bool) {
	inKernel := o != outcomeFailed
	if compared {
		r.inKernel[rec.Key()] = inKernel
	} else if ok, seen := r.inKernel[rec.Key()]; seen && o != outcomeApplied {
		inKernel = inKernel && ok
	}
	ref := podRef{pod.Namespace, pod.Name, pod.UID}
	pe := acc[ref]
	if pe == nil {
		pe = &podEffective{pod: pod, eff: Effective{Node: r.cfg.NodeName, Interfaces: map[string]EffectiveInterface{}}}
		acc[ref] = pe
	}
	if e, ok := effectiveOf(rec, inKernel); ok {
		pe.eff.Interfaces[rec.IfName] = e
		pe.shaped = true
	}
}

// publish keeps each pod's AnnotationEffective current (removed from a
// pod that no longer has shaping or controls) and posts a Normal Event
// when a shaped pod's value changes. A value sent is not sent again while
// the informer shows the pod at the version it was sent against, unless
// that lasts longer than resendAfter (a patch that failed); a newer
// version without it (someone removed or edited it) gets it again.
func (r *Reconciler) publish(acc map[podRef]*podEffective) {
	if r.cfg.Annotator == nil {
		return
	}
	now := time.Now()
	for ref, pe := range acc {
		want := ""
		if pe.shaped {
			want = pe.eff.encode()
		}
		have, has := pe.pod.Annotations[AnnotationEffective]
		if (want == "" && !has) || (has && have == want) {
			delete(r.published, ref) // settled
			r.announced[ref] = want
			continue
		}
		if sent, ok := r.published[ref]; ok && sent.value == want && sent.version == pe.pod.ResourceVersion && now.Sub(sent.at) < resendAfter {
			continue // sent; the informer has not shown it yet
		}
		r.published[ref] = sentValue{want, pe.pod.ResourceVersion, now}
		r.cfg.Annotator.Annotate(pe.pod, AnnotationEffective, want)
		// One Event per value: none when the agent only puts back an
		// annotation someone removed or edited, or after its restart.
		if want != "" && r.cfg.Events != nil && r.announced[ref] != want && !(has && sameEffective(have, want)) {
			if pe.eff.enforced() {
				r.cfg.Events.Normal(pe.pod, ReasonShapingApplied, pe.eff.summary())
			} else {
				r.cfg.Events.Warn(pe.pod, ReasonShapingNotEnforced, pe.eff.summary())
			}
		}
		r.announced[ref] = want
	}
}

// resendAfter bounds how long a sent value waits for the informer before
// it is sent again.
const resendAfter = 20 * time.Second

// sentValue is a value of AnnotationEffective sent to a pod.
type sentValue struct {
	value, version string
	at             time.Time
}

// sameEffective reports whether two values say the same, however
// formatted.
func sameEffective(a, b string) bool {
	var x, y Effective
	if json.Unmarshal([]byte(a), &x) != nil || json.Unmarshal([]byte(b), &y) != nil {
		return false
	}
	return x.encode() == y.encode()
}
