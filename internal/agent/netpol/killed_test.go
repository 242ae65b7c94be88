package netpol

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/qoscni/qoscni/internal/fault"
	"github.com/qoscni/qoscni/internal/testnet"
)

// TestAgentKilledMidUpdate: the agent's update (compile, one transaction)
// in a process of its own, SIGKILLed just before its transaction and just
// after it, for changes that swap what pod b accepts (from a to c),
// isolate a pod, and lift all isolation. After each kill, every probe
// gives what the old policies or the new ones say, all of one or all of
// the other: no pod is ever more open than one of them allows (never b
// open to d, whom no policy lets in). A run without a kill then brings
// the new state.
func TestAgentKilledMidUpdate(t *testing.T) {
	names := []string{"a", "b", "c", "d"}
	w := testnet.NewRouted(t, names...)
	bin := filepath.Join(t.TempDir(), "apply")
	if out, err := exec.Command("go", "build", "-tags", "faultinject", "-o", bin, "./testdata/apply").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	in := Input{Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "default",
		Labels: map[string]string{corev1.LabelMetadataName: "default"}}}}}
	for _, n := range names {
		in.addRouted(w, "default", n, map[string]string{"app": n}, nil)
	}
	from := func(target, peer string) *networkingv1.NetworkPolicy {
		return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: target + "-from-" + peer},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": target}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
					PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": peer}}}}}},
			}}
	}
	// apply runs the helper with policies and a fault point ("" = none);
	// killed says whether it died of SIGKILL.
	apply := func(policies []*networkingv1.NetworkPolicy, point string) (killed bool) {
		t.Helper()
		in.Policies = policies
		data, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(t.TempDir(), "input.json")
		if err := os.WriteFile(f, data, 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, w.Node.Path, f)
		cmd.Env = append(os.Environ(), fault.Env+"="+point)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL {
			return true
		}
		if err != nil {
			t.Fatalf("apply: %v\n%s", err, out)
		}
		return false
	}
	var probes []testnet.Probe
	for _, f := range names {
		for _, to := range names {
			if f != to {
				probes = append(probes, testnet.Probe{From: f, To: to, Port: 80}, testnet.Probe{From: f, To: to, V6: true, Port: 81})
			}
		}
	}
	// state is what the probes give under policies, per the oracle.
	state := func(policies []*networkingv1.NetworkPolicy) []bool {
		in.Policies = policies
		o := oracleOf(in)
		out := make([]bool, len(probes))
		for i, p := range probes {
			out[i] = o.allows(w.Addr(p.From, p.V6), w.Addr(p.To, p.V6), protoTCP, uint16(p.Port))
		}
		return out
	}
	equal := func(a, b []bool) bool { return fmt.Sprint(a) == fmt.Sprint(b) }
	changes := []struct {
		name     string
		old, new []*networkingv1.NetworkPolicy
	}{
		{"b accepts c instead of a", []*networkingv1.NetworkPolicy{from("b", "a")}, []*networkingv1.NetworkPolicy{from("b", "c")}},
		{"d isolated too", []*networkingv1.NetworkPolicy{from("b", "c")}, []*networkingv1.NetworkPolicy{from("b", "c"), from("d", "a")}},
		{"all lifted", []*networkingv1.NetworkPolicy{from("b", "c"), from("d", "a")}, nil},
	}
	for _, c := range changes {
		for _, point := range []string{"netpol:send", "netpol:sent"} {
			if apply(c.old, "") {
				t.Fatal("killed without a fault point")
			}
			if !apply(c.new, point) {
				t.Fatalf("%s: the update was not killed at %s", c.name, point)
			}
			got := w.Run(probes)
			old, neu := state(c.old), state(c.new)
			want, whole := "old", old
			if point == "netpol:sent" {
				want, whole = "new", neu
			}
			if !equal(got, whole) {
				t.Errorf("%s, killed at %s: want the %s policies whole", c.name, point, want)
				for i, p := range probes {
					if got[i] && !old[i] && !neu[i] {
						t.Errorf("  %s open, which neither the old nor the new policies allow", p)
					} else if got[i] != whole[i] {
						t.Errorf("  %s: got %v, want %v", p, got[i], whole[i])
					}
				}
			}
			// The next update, unkilled, brings the new state.
			apply(c.new, "")
			if got := w.Run(probes); !equal(got, neu) {
				t.Errorf("%s: after the update ran to its end: %v, want %v", c.name, got, neu)
			}
		}
		t.Logf("%s: killed before its transaction, the old policies whole; after, the new", c.name)
	}
}
