package reconcile_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// effective waits until the pod's AnnotationEffective satisfies ok.
func (e *env) effective(name, what string, ok func(v string, eff reconcile.Effective) error) reconcile.Effective {
	e.t.Helper()
	var last error
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(20 * time.Millisecond) {
		p, err := e.client.CoreV1().Pods("default").Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			e.t.Fatal(err)
		}
		v := p.Annotations[reconcile.AnnotationEffective]
		var eff reconcile.Effective
		if v != "" {
			if err := json.Unmarshal([]byte(v), &eff); err != nil {
				e.t.Fatalf("%s is not JSON: %v: %s", reconcile.AnnotationEffective, err, v)
			}
		}
		if last = ok(v, eff); last == nil {
			return eff
		}
	}
	e.t.Fatalf("%s: %v", what, last)
	return reconcile.Effective{}
}

// TestEffectiveShapingOnPod: the agent writes what a pod's annotations
// became into qoscni.io/effective-shaping, with a Normal Event, keeps it
// current when they change or someone removes it, and removes it when the
// pod is no longer shaped.
func TestEffectiveShapingOnPod(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	_, rec := e.addPod("eff", map[string]string{shaping.AnnotationIngressRate: "10M", shaping.AnnotationEgressPacketRate: "2k"})
	e.pass()
	eff := e.effective("eff", "shaping reported", func(v string, eff reconcile.Effective) error {
		i, ok := eff.Interfaces["eth0"]
		if !ok || i.Ingress == nil || i.Ingress.Limit != "10Mbit/s" || i.Ingress.Source != "annotation" || !i.InKernel ||
			i.Controls == nil || i.Controls.Egress == nil || i.Controls.Egress.PacketRate != 2000 {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	if eff.Node != testNode || eff.Interfaces["eth0"].Egress != nil {
		t.Errorf("effective: %+v", eff)
	}
	ip := strings.SplitN(rec.IPs[0], "/", 2)[0]
	if k := eff.Interfaces["eth0"].Kernel; k == nil || !slices.Contains(k.TC, "ingress: root qdisc 1: of "+rec.HostVeth) ||
		!slices.Contains(k.NFTables, "table inet qoscni pkt-egress4 "+ip) {
		t.Errorf("kernel objects: %+v", k)
	}
	var normal []corev1.Event
	for start := time.Now(); time.Since(start) < 5*time.Second && len(normal) == 0; time.Sleep(20 * time.Millisecond) {
		normal = e.eventsOf("eff", corev1.EventTypeNormal)
	}
	if len(normal) != 1 || normal[0].Reason != reconcile.ReasonShapingApplied || !strings.Contains(normal[0].Message, "eth0 ingress: limit 10Mbit/s (annotation)") {
		t.Fatalf("Normal events: %+v", normal)
	}
	t.Logf("event: %s", normal[0].Message)
	// A change follows; so does someone removing the annotation (the
	// user's update below replaces every annotation).
	e.annotate("eff", map[string]string{shaping.AnnotationIngressRate: "5M"})
	e.waitRecord(rec.ContainerID, "reshaped to 5M", func(r *state.Record) bool { return ingressRate(r) == 5_000_000 })
	e.effective("eff", "5M reported", func(v string, eff reconcile.Effective) error {
		if i := eff.Interfaces["eth0"]; i.Ingress == nil || i.Ingress.Limit != "5Mbit/s" || i.Controls != nil {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	// Someone removes only the report: the agent puts it back at once,
	// without another Event (the shaping did not change).
	e.annotate("eff", map[string]string{shaping.AnnotationIngressRate: "5M"})
	e.effective("eff", "report restored", func(v string, eff reconcile.Effective) error {
		if i := eff.Interfaces["eth0"]; i.Ingress == nil || i.Ingress.Limit != "5Mbit/s" {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond)
	if n := len(e.eventsOf("eff", corev1.EventTypeNormal)); n != 2 {
		t.Errorf("%d ShapingApplied events, want 2 (first, then 5M)", n)
	}
	// A qdisc of someone else replaces the pod's shaper: repair refuses
	// to touch it, and the pod's report says the limit is not enforced
	// (and stays so between passes); once it is gone, repair restores the
	// shaper and the report says so.
	e.node.Exec(t, "tc", "qdisc", "replace", "dev", rec.HostVeth, "root", "handle", "5:", "bfifo", "limit", "100000")
	e.pass()
	e.effective("eff", "not in the kernel", func(v string, eff reconcile.Effective) error {
		if i := eff.Interfaces["eth0"]; i.InKernel {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	time.Sleep(300 * time.Millisecond) // the drain our own patch causes must not say otherwise
	e.effective("eff", "still not in the kernel", func(v string, eff reconcile.Effective) error {
		if i := eff.Interfaces["eth0"]; i.InKernel {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	var warned bool
	for _, ev := range e.eventsOf("eff", corev1.EventTypeWarning) {
		warned = warned || (ev.Reason == reconcile.ReasonShapingNotEnforced && strings.Contains(ev.Message, "NOT in the kernel"))
	}
	if !warned {
		t.Error("no ShapingNotEnforced Warning")
	}
	e.node.Exec(t, "tc", "qdisc", "del", "dev", rec.HostVeth, "root")
	e.pass()
	e.effective("eff", "back in the kernel", func(v string, eff reconcile.Effective) error {
		if i := eff.Interfaces["eth0"]; !i.InKernel {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	e.annotate("eff", map[string]string{"unrelated": "x"})
	e.effective("eff", "annotation removed with the shaping", func(v string, _ reconcile.Effective) error {
		if v != "" {
			return fmt.Errorf("still %q", v)
		}
		return nil
	})
}
