package netpol

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/qoscni/qoscni/internal/cni/netpolnft"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// TestController: the agent's controller, against a fake API and a node
// namespace with three routed pods. A pod known to the API and recorded
// on the node is taken out of pending; one the API has not seen stays
// closed until it appears; a NetworkPolicy created, changed and deleted
// through the API is enforced within a second each time, and again after
// an `nft flush ruleset`; turning enforcement off in the network config
// lifts everything.
func TestController(t *testing.T) {
	w := testnet.NewRouted(t, "a", "b", "c")
	h, err := netns.GetFromPath(w.Node.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	dir := t.TempDir()
	confDir, stateDir := filepath.Join(dir, "net.d"), filepath.Join(dir, "state")
	conf := func(policy string) {
		t.Helper()
		if err := os.MkdirAll(confDir, 0o755); err != nil {
			t.Fatal(err)
		}
		c := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"qtest","plugins":[{"type":"qoscni","stateDir":%q%s}]}`, stateDir, policy)
		if err := os.WriteFile(filepath.Join(confDir, "10-qoscni.conflist"), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	conf(`,"policy":{"type":"k8s"}`)

	client := fake.NewClientset(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default", Labels: map[string]string{corev1.LabelMetadataName: "default"}}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	owner := func(p string) netpolnft.Owner {
		return netpolnft.Owner{ContainerID: "cid-" + p, IfName: "eth0", PodNamespace: "default", PodName: p}
	}
	addrs := func(p string) []netip.Addr { return []netip.Addr{w.Addr(p, false), w.Addr(p, true)} }
	pod := func(p string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: p, Labels: map[string]string{"app": p}},
			Status: corev1.PodStatus{PodIPs: []corev1.PodIP{{IP: w.Addr(p, false).String()}, {IP: w.Addr(p, true).String()}}}}
	}
	// ADD as the plugin does it: pending first, then the record.
	m, err := netpolnft.New(int(h))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	store := state.New(stateDir)
	for _, p := range []string{"a", "b", "c"} {
		if err := m.Pend(owner(p), addrs(p)); err != nil {
			t.Fatal(err)
		}
		rec := &state.Record{Network: "qtest", ContainerID: "cid-" + p, IfName: "eth0", Mode: state.ModeStandalone,
			Pod: state.Pod{Namespace: "default", Name: p}, IPs: []string{w.Addr(p, false).String() + "/24", w.Addr(p, true).String() + "/64"}}
		if p == "c" {
			continue // c's ADD has not written its record yet: pending only
		}
		if err := store.Save(rec); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"a", "b"} {
		if _, err := client.CoreV1().Pods("default").Create(ctx, pod(p), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	stop, err := Start(ctx, Config{Client: client, CNIConfDir: confDir, NetnsFd: int(h), Poll: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); stop() }()

	// eventually waits for the probes to give want, at most 1 s.
	eventually := func(what string, want bool, probes ...testnet.Probe) {
		t.Helper()
		start := time.Now()
		for {
			ok := true
			for _, got := range w.Run(probes) {
				ok = ok && got == want
			}
			if ok {
				t.Logf("%s: %v after %v", what, want, time.Since(start).Round(time.Millisecond))
				return
			}
			if time.Since(start) > time.Second {
				t.Fatalf("%s: not %v within 1 s\n%s", what, want, w.Node.Exec(t, "nft", "list", "table", "inet", "qoscni"))
			}
		}
	}
	ab := testnet.Probe{From: "a", To: "b", Port: 80}
	ab6 := testnet.Probe{From: "a", To: "b", V6: true, Port: 81}
	ca := testnet.Probe{From: "c", To: "a", Port: 80}
	eventually("a and b known and recorded: open", true, ab, ab6)
	eventually("c unknown to the API: closed", false, ca)
	if _, err := client.CoreV1().Pods("default").Create(ctx, pod("c"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("c known from its pending tag alone: open", true, ca)

	deny := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "b-from-a"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "c"}}}}}}}}
	if _, err := client.NetworkingV1().NetworkPolicies("default").Create(ctx, deny, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cb := testnet.Probe{From: "c", To: "b", Port: 80}
	eventually("b takes only c: a refused", false, ab, ab6)
	eventually("b takes only c: c allowed", true, cb)
	deny.Spec.Ingress[0].From[0].PodSelector.MatchLabels["app"] = "a"
	if _, err := client.NetworkingV1().NetworkPolicies("default").Update(ctx, deny, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("b takes only a: a allowed", true, ab, ab6)
	eventually("b takes only a: c refused", false, cb)
	if err := client.NetworkingV1().NetworkPolicies("default").Delete(ctx, deny.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("no policy", true, ab, cb)

	// A policy, then enforcement off: lifted, nothing pending left.
	if _, err := client.NetworkingV1().NetworkPolicies("default").Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "deny-all"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("deny all", false, ab, cb, ca)
	// A flushed ruleset enforces nothing: the agent writes it back.
	w.Node.Exec(t, "nft", "flush", "ruleset")
	eventually("deny all again after nft flush ruleset", false, ab, cb, ca)
	if err := m.Pend(owner("x"), []netip.Addr{netip.MustParseAddr("10.81.9.9")}); err != nil {
		t.Fatal(err)
	}
	conf("")
	eventually("enforcement off", true, ab, cb, ca)
	deadline := time.Now().Add(time.Second)
	for {
		p, err := m.Pending()
		if err != nil {
			t.Fatal(err)
		}
		if len(p) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pending after enforcement went off: %v", p)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
