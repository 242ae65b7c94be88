// Package admission tests deploy/admission, the ValidatingAdmissionPolicy
// of qoscni's pod annotations, against a real kube-apiserver: it refuses
// exactly what the plugin refuses, naming the annotation.
package admission

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/qoscni/qoscni/shaping"
	"github.com/qoscni/qoscni/test/e2e/cluster"
)

func deployDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..", "deploy", "admission")
}

// pluginRefuses is the plugin's verdict on a pod's annotations: the
// shaping limits and the guarantee, as ADD resolves them on a node with
// room for any request, and the packet-rate, connection and DSCP controls.
func pluginRefuses(ann map[string]string) error {
	if _, err := shaping.ParseControls(ann); err != nil {
		return err
	}
	in := shaping.Inputs{Annotations: ann}
	plan, err := shaping.Resolve(in, 1500)
	if err != nil {
		return err
	}
	_, err = shaping.ResolveGuarantee(in, plan, shaping.Capacity{IngressBits: shaping.MaxRateBits, EgressBits: shaping.MaxRateBits}, 1500)
	return err
}

func pod(name string, ann map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Annotations: ann},
		// Bound to a node that does not exist: no scheduler, no kubelet.
		Spec: corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "c", Image: "registry.k8s.io/pause:3.10"}}},
	}
}

func TestAnnotationPolicy(t *testing.T) {
	cp := cluster.StartControlPlane(t)
	ctx := context.Background()
	pods := cp.Client.CoreV1().Pods("default")

	// A pod from before the policy, with a value the policy refuses.
	if _, err := pods.Create(ctx, pod("legacy", map[string]string{"kubernetes.io/egress-bandwidth": "fast"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	var policy admissionv1.ValidatingAdmissionPolicy
	var binding admissionv1.ValidatingAdmissionPolicyBinding
	for name, into := range map[string]any{"policy.yaml": &policy, "binding.yaml": &binding} {
		b, err := os.ReadFile(filepath.Join(deployDir(), name))
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.UnmarshalStrict(b, into); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if _, err := cp.Client.AdmissionregistrationV1().ValidatingAdmissionPolicies().Create(ctx, &policy, metav1.CreateOptions{}); err != nil {
		t.Fatalf("the API server refuses the policy: %v", err)
	}
	if _, err := cp.Client.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Create(ctx, &binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The API server loads the policy a moment later; its type check
	// (warnings in status) must find nothing.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := pods.Create(ctx, pod("probe", map[string]string{"qoscni.io/bandwidth-priority": "urgent"}), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the policy does not refuse a bad priority after 30 s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if p, err := cp.Client.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(ctx, policy.Name, metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	} else if p.Status.TypeChecking != nil && len(p.Status.TypeChecking.ExpressionWarnings) > 0 {
		t.Errorf("type-check warnings: %+v", p.Status.TypeChecking.ExpressionWarnings)
	}

	long := strings.Repeat("1", 70)
	cases := []map[string]string{}
	for _, k := range []string{shaping.AnnotationIngressRate, shaping.AnnotationEgressRate, shaping.AnnotationIngressRequest, shaping.AnnotationEgressRequest,
		shaping.CalicoIngressBandwidth, shaping.CalicoEgressBandwidth} {
		for _, v := range []string{"10M", "1k", "999", "1.5k", "1Ki", "1P", "1.1P", "10Q", "", " 10M ", "-5M", "1e3", "1e100", long, "0", "fast"} {
			cases = append(cases, map[string]string{k: v})
		}
	}
	for _, k := range []string{shaping.AnnotationIngressBurst, shaping.AnnotationEgressBurst, shaping.CalicoIngressBurst, shaping.CalicoEgressBurst} {
		for _, v := range []string{"512k", "0", "-1", "abc", "9E", "10E", "1.5", "1e99", "1e100"} {
			cases = append(cases, map[string]string{k: v})
		}
	}
	for _, v := range []string{"10ms", "50us", "100us", "1h", "10", "1.5ms", "-1s", ".5s", "0", "1m30s", "5µs", "1d", " 20ms"} {
		cases = append(cases, map[string]string{shaping.AnnotationMaxQueueDelay: v})
	}
	for _, v := range []string{"high", "HIGH", " low ", "normal", "urgent", ""} {
		cases = append(cases, map[string]string{shaping.AnnotationPriority: v})
	}
	for _, k := range []string{shaping.AnnotationIngressPacketRate, shaping.CalicoEgressPacketRate, shaping.AnnotationEgressMaxConnections,
		shaping.CalicoIngressMaxConnections} {
		for _, v := range []string{"1000", "1", "0", "0.5", "10k", "10M", "10000001", "11M", "-5", "1e3", "1e100", "fast", "", " 100 ", "4294967295", "4294967296"} {
			cases = append(cases, map[string]string{k: v})
		}
	}
	for _, v := range []string{"EF", "ef", "af41", "AF44", "CS7", "CS8", "DF", "0", "63", "64", "063", "-1", "+5", "46.0", "", " 10 ", "99999999999999999999"} {
		cases = append(cases, map[string]string{shaping.AnnotationDSCP: v}, map[string]string{shaping.CalicoDSCP: v})
	}
	cases = append(cases,
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressRequest: "20M"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressRequest: "5M"},
		map[string]string{shaping.AnnotationIngressRate: "1G", shaping.AnnotationIngressRequest: "1G"},
		map[string]string{shaping.AnnotationIngressRate: "bad", shaping.AnnotationIngressRequest: "1G"},
		// Peak rates and minbursts, with a rate (without one, whether the
		// plugin accepts depends on the node's config: not checked here).
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "15M"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "10M"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "5M"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "34359738360"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "34359738361"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "40G"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "fast"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "15M", shaping.AnnotationEgressMinBurst: "3k"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "15M", shaping.AnnotationEgressMinBurst: "999"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "15M", shaping.AnnotationEgressMinBurst: "100M"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressPeakRate: "15M", shaping.AnnotationEgressMinBurst: "101M"},
		map[string]string{shaping.AnnotationEgressRate: "10M", shaping.AnnotationEgressMinBurst: "3k"},
		map[string]string{shaping.CalicoIngressBandwidth: "1M", shaping.CalicoIngressPeakrate: "2M", shaping.CalicoIngressMinburst: "2000"},
		map[string]string{shaping.CalicoIngressBandwidth: "1M", shaping.CalicoIngressPeakrate: "1M"},
		map[string]string{shaping.AnnotationIngressRate: "1M", shaping.CalicoIngressPeakrate: "2M", shaping.CalicoIngressMinburst: "99"},
		// Calico's names: read where qoscni's is absent, ignored where it is set.
		map[string]string{shaping.CalicoEgressBandwidth: "10M", shaping.AnnotationEgressRequest: "20M"},
		map[string]string{shaping.AnnotationEgressRate: "30M", shaping.CalicoEgressBandwidth: "10M", shaping.AnnotationEgressRequest: "20M"},
		map[string]string{shaping.AnnotationEgressRate: "30M", shaping.CalicoEgressBandwidth: "fast"},
		map[string]string{shaping.AnnotationIngressBurst: "1k", shaping.CalicoIngressBurst: "-5"},
		// A packet burst needs a packet rate, under either name.
		map[string]string{shaping.AnnotationEgressPacketRate: "1k", shaping.AnnotationEgressPacketBurst: "50"},
		map[string]string{shaping.AnnotationEgressPacketBurst: "50"},
		map[string]string{shaping.CalicoIngressPacketRate: "1k", shaping.AnnotationIngressPacketBurst: "10M"},
		map[string]string{shaping.CalicoIngressPacketRate: "1k", shaping.CalicoIngressPacketBurst: "11M"},
		map[string]string{shaping.CalicoIngressPacketBurst: "5"},
		map[string]string{shaping.AnnotationDSCP: "EF", shaping.CalicoDSCP: "bad"},
	)
	refused := 0
	for i, ann := range cases {
		goErr := pluginRefuses(ann)
		_, apiErr := pods.Create(ctx, pod(fmt.Sprintf("p%d", i), ann), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if (goErr == nil) != (apiErr == nil) {
			t.Errorf("%q: the plugin says %v, the API server %v", ann, goErr, apiErr)
			continue
		}
		if apiErr == nil {
			continue
		}
		refused++
		if refused == 1 {
			t.Logf("%q refused: %v", ann, apiErr)
		}
		named := false
		for k := range ann {
			named = named || strings.Contains(apiErr.Error(), "annotation "+k)
		}
		if !named || !strings.Contains(apiErr.Error(), "qoscni-annotations") {
			t.Errorf("%q: refusal %q does not name the annotation and the policy", ann, apiErr)
		}
	}
	t.Logf("%d annotation sets: %d refused by both the plugin and the API server, the rest accepted by both", len(cases), refused)
	if refused < len(cases)/3 || refused == len(cases) {
		t.Errorf("%d of %d refused: the table does not exercise both sides", refused, len(cases))
	}

	// Updates: a pod admitted before the policy keeps being updatable in
	// other ways; setting a bad value is refused, a good one accepted.
	legacy, err := pods.Get(ctx, "legacy", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	legacy.Labels = map[string]string{"touched": "yes"}
	if legacy, err = pods.Update(ctx, legacy, metav1.UpdateOptions{}); err != nil {
		t.Errorf("a label on a pod admitted before the policy: %v", err)
	}
	legacy.Annotations["kubernetes.io/egress-bandwidth"] = "faster"
	if _, err := pods.Update(ctx, legacy, metav1.UpdateOptions{}); err == nil || !strings.Contains(err.Error(), "annotation kubernetes.io/egress-bandwidth") {
		t.Errorf("a bad new value on update: %v", err)
	}
	legacy.Annotations["kubernetes.io/egress-bandwidth"] = "20M"
	if _, err := pods.Update(ctx, legacy, metav1.UpdateOptions{}); err != nil {
		t.Errorf("a good new value on update: %v", err)
	}
}
