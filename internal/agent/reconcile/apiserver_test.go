package reconcile_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/qoscni/qoscni/internal/agent/kube"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
	"github.com/qoscni/qoscni/test/e2e/cluster"
)

// apiEnv is env against a real kube-apiserver and etcd on loopback
// (test/e2e/cluster) instead of the fake clientset: the field selector, the
// agent's protobuf client, watch delivery and Event validation are the API
// server's own. Only the client differs from newEnv, so the kernel helpers
// of env (record, waitRecord, diff, pass, metric, assertGone) serve both.
type apiEnv struct {
	*env
	cp      *cluster.ControlPlane
	api     kubernetes.Interface // the agent's client, built from the kubeconfig
	watcher *kube.PodWatcher
}

func newAPIEnv(t *testing.T) *apiEnv {
	t.Helper()
	testnet.RequireRoot(t)
	cp := cluster.StartControlPlane(t) // skips when the binaries are not built
	e, fd, log := baseEnv(t, "10.79.0.0/24")
	node := e.node
	// The agent's own client construction, as with --kubeconfig.
	api, err := kube.NewClient(cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := cp.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: testNode},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.79.255.1"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var h handler
	w, err := kube.NewPodWatcher(api, testNode, &h, log)
	if err != nil {
		t.Fatal(err)
	}
	cfg := reconcile.Config{
		StateDir: node.StateDir, CNIConfDir: e.confDir, NetnsFd: fd, Interval: time.Hour, Metrics: e.metrics, Logger: log,
		Pods: w, Events: &kube.Events{Client: api, Node: testNode, Log: log},
	}
	r, err := reconcile.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.r, e.rec = r, r
	runCtx, cancel := context.WithCancel(ctx)
	e.cancel = cancel
	w.Start(runCtx)
	syncCtx, syncCancel := context.WithTimeout(runCtx, 30*time.Second)
	defer syncCancel()
	if !w.WaitForSync(syncCtx) {
		cancel()
		t.Fatal("informer did not sync with the API server")
	}
	done := make(chan struct{})
	go func() { _ = r.Run(runCtx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		w.Shutdown()
		r.Close()
	})
	return &apiEnv{env: e, cp: cp, api: api, watcher: w}
}

// createPod creates a pod bound to node (nothing runs it: there is no
// kubelet) and returns it with its server-assigned UID.
func (a *apiEnv) createPod(name, node string, annotations map[string]string) *corev1.Pod {
	a.t.Helper()
	p, err := a.cp.Client.CoreV1().Pods("default").Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Annotations: annotations},
		Spec: corev1.PodSpec{
			NodeName:   node,
			Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		a.t.Fatal(err)
	}
	return p
}

// wire runs the plugin's ADD for the pod as the runtime would: with the
// pod's real UID and its annotations in runtimeConfig.
func (a *apiEnv) wire(pod *corev1.Pod) (*testnet.NS, *state.Record) {
	t := a.t
	t.Helper()
	ns := a.node.NewPod(t)
	conf := map[string]any{}
	for k, v := range a.conf {
		conf[k] = v
	}
	conf["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": pod.Annotations}
	b, _ := json.Marshal(conf)
	cid := "c" + pod.Name
	a.node.Invoke(t, testnet.Call{Command: "ADD", ContainerID: cid, Netns: ns.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=" + pod.Namespace + ";K8S_POD_NAME=" + pod.Name + ";K8S_POD_UID=" + string(pod.UID), Config: b}).MustSucceed(t, "ADD "+pod.Name)
	t.Cleanup(func() {
		plain, _ := json.Marshal(a.conf)
		a.node.Invoke(t, testnet.Call{Command: "DEL", ContainerID: cid, Netns: ns.Path, IfName: "eth0", Config: plain})
	})
	return ns, a.record(cid)
}

// annotateAPI replaces the pod's annotations with an Update, as kubectl
// annotate --overwrite would.
func (a *apiEnv) annotateAPI(name string, annotations map[string]string) {
	a.t.Helper()
	pods := a.cp.Client.CoreV1().Pods("default")
	p, err := pods.Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		a.t.Fatal(err)
	}
	p.Annotations = annotations
	if _, err := pods.Update(context.Background(), p, metav1.UpdateOptions{}); err != nil {
		a.t.Fatal(err)
	}
}

// waitEvents lists the pod's events from the API until there are n.
func (a *apiEnv) waitEvents(name string, n int, within time.Duration) []corev1.Event {
	a.t.Helper()
	var out []corev1.Event
	for deadline := time.Now().Add(within); ; {
		l, err := a.cp.Client.CoreV1().Events("default").List(context.Background(), metav1.ListOptions{
			FieldSelector: "involvedObject.name=" + name,
		})
		if err != nil {
			a.t.Fatal(err)
		}
		out = l.Items
		if len(out) >= n || time.Now().After(deadline) {
			return out
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Issue 6 against a real API server: the annotation changes with an
// Update, the kernel follows within 2 s, a bad value keeps the shaping and
// leaves a valid Event, and a deleted pod's attachment is collected.
func TestAPIServerAnnotationChange(t *testing.T) {
	a := newAPIEnv(t)

	// A pod of another node: the watcher's field selector keeps it out
	// (the fake clientset ignores field selectors).
	a.createPod("elsewhere", "node-b", map[string]string{shaping.AnnotationIngressRate: "1M"})
	pod := a.createPod("web", testNode, map[string]string{shaping.AnnotationIngressRate: "20M", shaping.AnnotationEgressRate: "10M"})
	podNS, rec := a.wire(pod)
	if ingressRate(rec) != 20_000_000 || egressRate(rec) != 10_000_000 {
		t.Fatalf("ADD shaping: %+v", rec.Shaping)
	}
	if rec.Pod.UID != string(pod.UID) {
		t.Fatalf("record pod UID %q, API %q", rec.Pod.UID, pod.UID)
	}
	idx := linkIndex(t, a.node, rec.HostVeth)
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, ok := a.watcher.Pod("default", "web"); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("watcher did not see the pod within 2 s")
		}
	}
	if _, ok := a.watcher.Pod("default", "elsewhere"); ok {
		t.Error("watcher sees a pod of another node")
	}
	// The UIDs the DRA grant GC keeps grants for: this node's pods only.
	if uids := a.watcher.UIDs(); !uids[string(pod.UID)] || len(uids) != 1 {
		t.Errorf("watcher UIDs %v, want only web's %s", uids, pod.UID)
	}

	// The change: Update to 5M, kernel and record within 2 s.
	a.annotateAPI("web", map[string]string{shaping.AnnotationIngressRate: "5M", shaping.AnnotationEgressRate: "10M"})
	took := a.waitRecord(rec.ContainerID, "reshape to 5M", func(r *state.Record) bool { return ingressRate(r) == 5_000_000 })
	t.Logf("record at the new rate %v after the Update returned", took)
	if q := a.node.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth); !strings.Contains(q, "rate 5Mbit") {
		t.Errorf("kernel after the Update: %s", q)
	}
	if d := a.diff(a.record(rec.ContainerID)); len(d) != 0 {
		t.Errorf("kernel differs from the record: %q", d)
	}
	if got := linkIndex(t, a.node, rec.HostVeth); got != idx {
		t.Errorf("host veth was recreated (ifindex %s -> %s)", idx, got)
	}
	if v := a.metric("qoscni_agent_reshapes_total", "result", "applied"); v != 1 {
		t.Errorf("reshapes{applied} = %v", v)
	}

	// A bad value: shaping kept, one Event the API server accepted.
	a.annotateAPI("web", map[string]string{shaping.AnnotationIngressRate: "10Q", shaping.AnnotationEgressRate: "1M"})
	evs := a.waitEvents("web", 1, 5*time.Second)
	if len(evs) != 1 {
		t.Fatalf("events on web: %+v", evs)
	}
	ev := evs[0]
	if ev.Type != corev1.EventTypeWarning || ev.Reason != reconcile.ReasonInvalidAnnotation || !strings.Contains(ev.Message, "10Q") ||
		ev.InvolvedObject.Kind != "Pod" || ev.InvolvedObject.UID != pod.UID || ev.Source.Host != testNode {
		t.Errorf("event: %+v", ev)
	}
	now := a.record(rec.ContainerID)
	if ingressRate(now) != 5_000_000 || egressRate(now) != 10_000_000 {
		t.Errorf("shaping changed on a bad value: %+v", now.Shaping)
	}
	if d := a.diff(now); len(d) != 0 {
		t.Errorf("kernel differs from the record after a bad value: %q", d)
	}
	a.pass()
	if n := len(a.waitEvents("web", 2, 300*time.Millisecond)); n != 1 {
		t.Errorf("%d events for one bad value", n)
	}

	// Fixed: applied.
	a.annotateAPI("web", map[string]string{shaping.AnnotationIngressRate: "2M", shaping.AnnotationEgressRate: "1M"})
	a.waitRecord(rec.ContainerID, "fixed value applied", func(r *state.Record) bool {
		return ingressRate(r) == 2_000_000 && egressRate(r) == 1_000_000
	})
	if d := a.diff(a.record(rec.ContainerID)); len(d) != 0 {
		t.Errorf("kernel differs from the record after the fix: %q", d)
	}

	// Deleted from the API and torn down by the runtime: collected.
	if err := a.cp.Client.CoreV1().Pods("default").Delete(context.Background(), "web", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, ok := a.watcher.Pod("default", "web"); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("watcher still has the deleted pod after 2 s")
		}
	}
	testnet.Run(t, "ip", "netns", "del", podNS.Name)
	if res := a.pass(); res.GCed != 1 || res.Errors != 0 {
		t.Errorf("pass after delete: %+v", res)
	}
	a.assertGone(rec)
}
