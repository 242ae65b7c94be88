package reconcile_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/util/retry"

	"github.com/qoscni/qoscni/internal/agent/kube"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
)

const (
	testNode    = "node-a"
	testNetwork = "qrec"
)

// env is a node namespace with the plugin's config in a CNI config dir,
// a fake API server and a running reconciler fed by the pod informer.
type env struct {
	t       *testing.T
	node    *testnet.Node
	confDir string
	conf    map[string]any
	client  *fake.Clientset
	rec     *reconcile.Reconciler
	metrics *reconcile.Metrics
	reg     *prometheus.Registry
	store   *state.Store
	cancel  context.CancelFunc
}

type envOpts struct {
	noAPI bool
	// configure adjusts the reconciler's config before it starts.
	configure func(*env, *reconcile.Config)
}

// baseEnv makes the node netns, a conflist for subnet and the reconciler's
// metrics; it returns the node netns fd and a test logger.
func baseEnv(t *testing.T, subnet string) (*env, int, *slog.Logger) {
	t.Helper()
	node := testnet.NewNode(t)
	e := &env{t: t, node: node, confDir: t.TempDir(), store: state.New(node.StateDir)}
	e.conf = map[string]any{
		"cniVersion": "1.1.0", "name": testNetwork, "type": "qoscni", "bridge": "qbr0",
		"isDefaultGateway": true, "ipMasq": true, "stateDir": node.StateDir,
		"capabilities": map[string]any{"bandwidth": true, "io.kubernetes.cri.pod-annotations": true},
		"ipam": map[string]any{
			"ranges":  []any{[]any{map[string]any{"subnet": subnet}}},
			"dataDir": node.IPAMDir,
		},
	}
	b, _ := json.Marshal(e.conf)
	if err := os.WriteFile(filepath.Join(e.confDir, "10-qrec.conf"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(node.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e.metrics = reconcile.NewMetrics()
	e.reg = prometheus.NewRegistry()
	if err := e.metrics.Register(e.reg); err != nil {
		t.Fatal(err)
	}
	return e, fd, log
}

func newEnv(t *testing.T, o envOpts) *env {
	t.Helper()
	e, fd, log := baseEnv(t, "10.78.0.0/24")
	node := e.node
	var err error
	cfg := reconcile.Config{StateDir: node.StateDir, CNIConfDir: e.confDir, NetnsFd: fd, Interval: time.Hour, Metrics: e.metrics, Logger: log}
	if o.configure != nil {
		o.configure(e, &cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	var h handler
	var w *kube.PodWatcher
	if !o.noAPI {
		e.client = fake.NewClientset()
		w, err = kube.NewPodWatcher(e.client, testNode, &h, log)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Pods = w
		cfg.Events = &kube.Events{Client: e.client, Node: testNode, Log: log}
		cfg.Annotator = &kube.Annotator{Client: e.client, Log: log}
		cfg.NodeName = testNode
	}
	r, err := reconcile.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.r, e.rec = r, r
	if w != nil {
		w.Start(ctx)
		if !w.WaitForSync(ctx) {
			t.Fatal("informer did not sync")
		}
	}
	done := make(chan struct{})
	go func() { _ = r.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if w != nil {
			w.Shutdown()
		}
		r.Close()
	})
	return e
}

type handler struct{ r *reconcile.Reconciler }

func (h *handler) PodChanged(ns, name string) { h.r.PodChanged(ns, name) }

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var _ io.Writer = testWriter{}

// addPod creates the pod object (unless noAPI) and runs the plugin's ADD
// with the annotations as containerd passes them.
func (e *env) addPod(name string, annotations map[string]string) (*testnet.NS, *state.Record) {
	e.t.Helper()
	return e.addPodTo(e.conf, e.store, name, annotations)
}

// addPodTo is addPod on the network of plugin config netConf, whose
// records store holds.
func (e *env) addPodTo(netConf map[string]any, store *state.Store, name string, annotations map[string]string) (*testnet.NS, *state.Record) {
	t := e.t
	t.Helper()
	ns := e.node.NewPod(t)
	conf := map[string]any{}
	for k, v := range netConf {
		conf[k] = v
	}
	conf["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": annotations}
	b, _ := json.Marshal(conf)
	cid := "c" + name
	e.node.Invoke(t, testnet.Call{Command: "ADD", ContainerID: cid, Netns: ns.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + name + ";K8S_POD_UID=uid-" + name, Config: b}).MustSucceed(t, "ADD "+name)
	t.Cleanup(func() {
		plain, _ := json.Marshal(netConf)
		e.node.Invoke(t, testnet.Call{Command: "DEL", ContainerID: cid, Netns: ns.Path, IfName: "eth0", Config: plain})
	})
	if e.client != nil {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, UID: types.UID("uid-" + name), Annotations: annotations},
			Spec:       corev1.PodSpec{NodeName: testNode},
		}
		if _, err := e.client.CoreV1().Pods("default").Create(context.Background(), pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	rec, err := store.Load(state.Key{Network: netConf["name"].(string), ContainerID: cid, IfName: "eth0"})
	if err != nil || rec == nil {
		t.Fatalf("record of %s: %v", name, err)
	}
	return ns, rec
}

func (e *env) record(cid string) *state.Record {
	e.t.Helper()
	rec, err := e.store.Load(state.Key{Network: testNetwork, ContainerID: cid, IfName: "eth0"})
	if err != nil {
		e.t.Fatal(err)
	}
	return rec
}

func (e *env) annotate(name string, annotations map[string]string) time.Time {
	e.t.Helper()
	pods := e.client.CoreV1().Pods("default")
	start := time.Now()
	// The agent may patch the pod (its effective-shaping annotation)
	// between the read and the write.
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		p, err := pods.Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		p.Annotations = annotations
		// A new version, as a real API server gives each write: the
		// agent tells a change made after its own patch from that patch
		// still on its way by the version (the fake API keeps none, and a
		// report removed before the agent saw it would wait 20 s).
		p.ResourceVersion = strconv.FormatInt(time.Now().UnixNano(), 10)
		_, err = pods.Update(context.Background(), p, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return start
}

// waitRecord polls the record until ok, within the 2 s.
func (e *env) waitRecord(cid string, what string, ok func(*state.Record) bool) time.Duration {
	e.t.Helper()
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		if r := e.record(cid); r != nil && ok(r) {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond)
	}
	e.t.Fatalf("%s: not within 2 s; record: %+v", what, e.record(cid))
	return 0
}

func (e *env) pass() reconcile.PassResult {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := e.rec.PassNow(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	return res
}

func rate(d *state.Direction) uint64 {
	if d == nil {
		return 0
	}
	return d.RateBits
}

func ingressRate(r *state.Record) uint64 {
	if r.Shaping == nil {
		return 0
	}
	return rate(r.Shaping.Ingress)
}

func egressRate(r *state.Record) uint64 {
	if r.Shaping == nil {
		return 0
	}
	return rate(r.Shaping.Egress)
}

// diff compares the kernel with the record through the CHECK routine.
func (e *env) diff(rec *state.Record) []string {
	e.t.Helper()
	s, err := shaping.OpenNetns(e.node.Path)
	if err != nil {
		e.t.Fatal(err)
	}
	defer s.Close()
	ifb := podnet.IFBName(rec.ContainerID, rec.IfName)
	d, err := s.Diff(shaping.FromRecord(rec, ifb))
	if err != nil {
		e.t.Fatal(err)
	}
	return d
}

func linkIndex(t *testing.T, n *testnet.Node, name string) string {
	t.Helper()
	out := n.Exec(t, "ip", "-o", "link", "show", "dev", name)
	return strings.SplitN(out, ":", 2)[0]
}

// The central case: the annotation changes under a running TCP
// flow; the veth is reshaped in place within 2 s, the flow survives and
// converges to the new rate. Not parallel: throughput wants the CPU.
func TestAnnotationChangeReshapesInPlaceWithFlow(t *testing.T) {
	e := newEnv(t, envOpts{})
	podNS, rec := e.addPod("flow", map[string]string{shaping.AnnotationIngressRate: "20M"})
	if ingressRate(rec) != 20_000_000 {
		t.Fatalf("ADD shaping: %+v", rec.Shaping)
	}
	idx := linkIndex(t, e.node, rec.HostVeth)
	testnet.StartIperf3(t, podNS)
	podIP := strings.SplitN(rec.IPs[0], "/", 2)[0]
	var out []byte
	done := make(chan error, 1)
	go func() {
		var err error
		out, err = exec.Command("ip", "netns", "exec", e.node.Name, "iperf3", "-c", podIP, "-t", "7", "-i", "1", "-J").Output()
		done <- err
	}()
	time.Sleep(2500 * time.Millisecond)
	e.annotate("flow", map[string]string{shaping.AnnotationIngressRate: "5M"})
	took := e.waitRecord(rec.ContainerID, "reshape to 5M", func(r *state.Record) bool { return ingressRate(r) == 5_000_000 })
	t.Logf("record at the new rate %v after the update", took)
	if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth); !strings.Contains(q, "rate 5Mbit") {
		t.Errorf("kernel: %s", q)
	}
	if err := <-done; err != nil {
		t.Fatalf("flow broke during reshape: %v %s", err, out)
	}
	var res struct {
		Intervals []struct {
			Sum struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum"`
		} `json:"intervals"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &res); err != nil || res.Error != "" || len(res.Intervals) < 7 {
		t.Fatalf("iperf3: %v %q (%d intervals)", err, res.Error, len(res.Intervals))
	}
	first := res.Intervals[1].Sum.BitsPerSecond
	last := res.Intervals[len(res.Intervals)-1].Sum.BitsPerSecond
	t.Logf("before %.2f Mbit/s, after %.2f Mbit/s", first/1e6, last/1e6)
	if first < 14e6 || last > 6.5e6 || last < 3e6 {
		t.Errorf("rate did not follow the annotation: %.2f then %.2f Mbit/s", first/1e6, last/1e6)
	}
	if got := linkIndex(t, e.node, rec.HostVeth); got != idx {
		t.Errorf("host veth was recreated (ifindex %s -> %s)", idx, got)
	}
	if d := e.diff(e.record(rec.ContainerID)); len(d) != 0 {
		t.Errorf("kernel differs from the record: %q", d)
	}
	if v := e.metric("qoscni_agent_reshapes_total", "result", "applied"); v != 1 {
		t.Errorf("reshapes{applied} = %v", v)
	}
}

// metric reads one counter series from the reconciler's metrics.
func (e *env) metric(name, label, value string) float64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

func TestAnnotationRemovalRemovesShaping(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	_, rec := e.addPod("rm", map[string]string{shaping.AnnotationIngressRate: "10M", shaping.AnnotationEgressRate: "20M"})
	ifb := rec.Shaping.IFB
	if ifb == "" || egressRate(rec) != 20_000_000 {
		t.Fatalf("ADD shaping: %+v", rec.Shaping)
	}
	e.annotate("rm", map[string]string{shaping.AnnotationIngressRate: "10M", "unrelated": "x"})
	e.waitRecord(rec.ContainerID, "egress removed", func(r *state.Record) bool { return r.Shaping != nil && r.Shaping.Egress == nil })
	if _, err := e.node.Try("ip", "link", "show", ifb); err == nil {
		t.Errorf("IFB %s survived the removal of the egress annotation", ifb)
	}
	if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth); strings.Contains(q, "clsact") || !strings.Contains(q, "rate 10Mbit") {
		t.Errorf("veth after egress removal: %s", q)
	}
	e.annotate("rm", map[string]string{"unrelated": "x"})
	e.waitRecord(rec.ContainerID, "all shaping removed", func(r *state.Record) bool { return r.Shaping == nil })
	if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth); strings.Contains(q, "tbf") {
		t.Errorf("veth after ingress removal: %s", q)
	}
	if d := e.diff(e.record(rec.ContainerID)); len(d) != 0 {
		t.Errorf("kernel differs from the record: %q", d)
	}
	// Back again: an annotation on an unshaped pod creates the pipeline.
	e.annotate("rm", map[string]string{shaping.AnnotationEgressRate: "3M"})
	e.waitRecord(rec.ContainerID, "egress added", func(r *state.Record) bool { return egressRate(r) == 3_000_000 })
	if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", ifb); !strings.Contains(q, "rate 3Mbit") {
		t.Errorf("IFB: %s", q)
	}
}

// Calico's annotation names shape a pod from ADD and reshape it live;
// qoscni's name, once added, wins over Calico's.
func TestCalicoAnnotationsReshapeLive(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	_, rec := e.addPod("calico", map[string]string{shaping.CalicoEgressBandwidth: "20M"})
	if egressRate(rec) != 20_000_000 {
		t.Fatalf("ADD from Calico's name: %+v", rec.Shaping)
	}
	e.annotate("calico", map[string]string{shaping.CalicoEgressBandwidth: "5M"})
	e.waitRecord(rec.ContainerID, "reshaped to Calico's 5M", func(r *state.Record) bool { return egressRate(r) == 5_000_000 })
	if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", rec.Shaping.IFB); !strings.Contains(q, "rate 5Mbit") {
		t.Errorf("IFB after Calico's change: %s", q)
	}
	e.annotate("calico", map[string]string{shaping.CalicoEgressBandwidth: "5M", shaping.AnnotationEgressRate: "8M"})
	e.waitRecord(rec.ContainerID, "qoscni's name wins", func(r *state.Record) bool { return egressRate(r) == 8_000_000 })
	// A peak rate, added live, then Calico's name for it.
	e.annotate("calico", map[string]string{shaping.AnnotationEgressRate: "8M", shaping.AnnotationEgressPeakRate: "16M"})
	e.waitRecord(rec.ContainerID, "peak rate 16M", func(r *state.Record) bool {
		return r.Shaping != nil && r.Shaping.Egress != nil && r.Shaping.Egress.PeakBits == 16_000_000
	})
	if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", rec.Shaping.IFB); !strings.Contains(q, "peakrate 16Mbit") {
		t.Errorf("IFB after the peak: %s", q)
	}
	e.annotate("calico", map[string]string{shaping.AnnotationEgressRate: "8M", shaping.CalicoEgressPeakrate: "12M"})
	e.waitRecord(rec.ContainerID, "Calico's peak rate 12M", func(r *state.Record) bool {
		return r.Shaping != nil && r.Shaping.Egress != nil && r.Shaping.Egress.PeakBits == 12_000_000
	})
	e.annotate("calico", map[string]string{"unrelated": "x"})
	e.waitRecord(rec.ContainerID, "shaping removed with both names", func(r *state.Record) bool { return r.Shaping == nil })
}

// events are the Warning Events on pod name.
func (e *env) events(name string) []corev1.Event { return e.eventsOf(name, corev1.EventTypeWarning) }

func (e *env) eventsOf(name, typ string) []corev1.Event {
	e.t.Helper()
	l, err := e.client.CoreV1().Events("default").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	var out []corev1.Event
	for _, ev := range l.Items {
		if ev.InvolvedObject.Name == name && ev.Type == typ {
			out = append(out, ev)
		}
	}
	return out
}

func TestBadAnnotationKeepsShapingAndEmitsEvent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	_, rec := e.addPod("bad", map[string]string{shaping.AnnotationIngressRate: "10M", shaping.AnnotationEgressRate: "10M"})
	e.annotate("bad", map[string]string{shaping.AnnotationIngressRate: "10Q", shaping.AnnotationEgressRate: "1M"})
	deadline := time.Now().Add(2 * time.Second)
	var evs []corev1.Event
	for time.Now().Before(deadline) {
		if evs = e.events("bad"); len(evs) > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(evs) != 1 {
		t.Fatalf("events: %+v", evs)
	}
	ev := evs[0]
	if ev.Type != corev1.EventTypeWarning || ev.Reason != reconcile.ReasonInvalidAnnotation || !strings.Contains(ev.Message, "10Q") ||
		ev.InvolvedObject.Kind != "Pod" || string(ev.InvolvedObject.UID) != "uid-bad" || ev.Source.Host != testNode {
		t.Errorf("event: %+v", ev)
	}
	// The last good shaping stays, both directions (the plan is all or nothing).
	now := e.record(rec.ContainerID)
	if ingressRate(now) != 10_000_000 || egressRate(now) != 10_000_000 {
		t.Errorf("shaping changed on a bad value: %+v", now.Shaping)
	}
	if d := e.diff(now); len(d) != 0 {
		t.Errorf("kernel differs from the record: %q", d)
	}
	// The same bad value is reported once, however often it is looked at.
	e.pass()
	e.annotate("bad", map[string]string{shaping.AnnotationIngressRate: "10Q", shaping.AnnotationEgressRate: "1M", shaping.AnnotationMaxQueueDelay: "20ms", "other": "y"})
	time.Sleep(200 * time.Millisecond)
	if n := len(e.events("bad")); n != 1 {
		t.Errorf("%d events for one bad value", n)
	}
	if v := e.metric("qoscni_agent_reshapes_total", "result", "invalid"); v != 1 {
		t.Errorf("reshapes{invalid} = %v, want 1", v)
	}
	// Fixed: applied.
	e.annotate("bad", map[string]string{shaping.AnnotationIngressRate: "2M", shaping.AnnotationEgressRate: "1M"})
	e.waitRecord(rec.ContainerID, "fixed value applied", func(r *state.Record) bool {
		return ingressRate(r) == 2_000_000 && egressRate(r) == 1_000_000
	})
}

func TestDriftRepaired(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	_, rec := e.addPod("drift", map[string]string{shaping.AnnotationIngressRate: "10M", shaping.AnnotationEgressRate: "20M"})
	if res := e.pass(); res.Repaired != 0 || res.Reshaped != 0 || res.Errors != 0 {
		t.Fatalf("pass on a clean node: %+v", res)
	}
	// By hand: the egress shaper deleted, the ingress rate changed, the
	// redirect filter removed.
	e.node.Exec(t, "tc", "qdisc", "del", "dev", rec.Shaping.IFB, "root")
	e.node.Exec(t, "tc", "qdisc", "change", "dev", rec.HostVeth, "root", "handle", "1:", "tbf", "rate", "50mbit", "burst", "62500", "limit", "62500")
	e.node.Exec(t, "tc", "filter", "del", "dev", rec.HostVeth, "ingress")
	if d := e.diff(rec); len(d) != 3 {
		t.Fatalf("drift not visible: %q", d)
	}
	res := e.pass()
	if res.Repaired != 1 || res.Errors != 0 {
		t.Errorf("pass: %+v", res)
	}
	if d := e.diff(rec); len(d) != 0 {
		t.Errorf("after repair: %q", d)
	}
	if v := e.metric("qoscni_agent_repairs_total", "kind", "shaping"); v != 1 {
		t.Errorf("repairs{shaping} = %v", v)
	}
	if res := e.pass(); res.Repaired != 0 {
		t.Errorf("second pass repaired again: %+v", res)
	}
}

// assertGone checks that nothing of the attachment is left.
func (e *env) assertGone(rec *state.Record) {
	t := e.t
	t.Helper()
	for _, l := range []string{rec.HostVeth, podnet.IFBName(rec.ContainerID, rec.IfName)} {
		if _, err := e.node.Try("ip", "link", "show", l); err == nil {
			t.Errorf("link %s left", l)
		}
	}
	if r := e.record(rec.ContainerID); r != nil {
		t.Errorf("record left")
	}
	ip := strings.SplitN(rec.IPs[0], "/", 2)[0]
	if _, err := os.Stat(filepath.Join(e.node.IPAMDir, testNetwork, ip)); err == nil {
		t.Errorf("address %s still reserved", ip)
	}
	if out, err := e.node.Try("nft", "list", "set", "inet", "qoscni", "masq-src4"); err == nil && strings.Contains(out, ip) {
		t.Errorf("masquerade element left: %s", out)
	}
}

func TestGCStaleAttachment(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	podNS, rec := e.addPod("gone", map[string]string{shaping.AnnotationIngressRate: "10M", shaping.AnnotationEgressRate: "20M"})
	_, keep := e.addPod("alive", map[string]string{shaping.AnnotationEgressRate: "20M"})
	ip := strings.SplitN(rec.IPs[0], "/", 2)[0]
	if out := e.node.Exec(t, "nft", "list", "set", "inet", "qoscni", "masq-src4"); !strings.Contains(out, ip) {
		t.Fatalf("no masquerade element after ADD: %s", out)
	}
	// The netns is gone but the API still has the pod: kept.
	testnet.Run(t, "ip", "netns", "del", podNS.Name)
	if res := e.pass(); res.GCed != 0 {
		t.Fatalf("GC'd while the pod exists: %+v", res)
	}
	if err := e.client.CoreV1().Pods("default").Delete(context.Background(), "gone", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the informer sees the delete
	res := e.pass()
	if res.GCed != 1 || res.Errors != 0 {
		t.Errorf("pass: %+v", res)
	}
	e.assertGone(rec)
	if v := e.metric("qoscni_agent_gc_total", "kind", "attachment"); v != 1 {
		t.Errorf("gc{attachment} = %v", v)
	}
	// The live pod kept everything.
	if r := e.record(keep.ContainerID); r == nil || len(e.diff(r)) != 0 {
		t.Errorf("live attachment touched: %+v", r)
	}
	// A pod that is gone from the API but whose netns lives: kept (the
	// runtime has not torn it down yet).
	if err := e.client.CoreV1().Pods("default").Delete(context.Background(), "alive", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if res := e.pass(); res.GCed != 0 {
		t.Errorf("GC'd while the netns exists: %+v", res)
	}
}

func TestGCWithoutAPI(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{noAPI: true})
	podNS, rec := e.addPod("noapi", map[string]string{shaping.AnnotationEgressRate: "20M"})
	if res := e.pass(); res.GCed != 0 || res.Errors != 0 {
		t.Fatalf("pass with a live netns: %+v", res)
	}
	// Drift repair works without the API too.
	e.node.Exec(t, "tc", "qdisc", "del", "dev", rec.Shaping.IFB, "root")
	if res := e.pass(); res.Repaired != 1 {
		t.Errorf("repair without API: %+v", res)
	}
	testnet.Run(t, "ip", "netns", "del", podNS.Name)
	if res := e.pass(); res.GCed != 1 || res.Errors != 0 {
		t.Errorf("pass: %+v", res)
	}
	e.assertGone(rec)
}

func TestGCLeftoverLinks(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{noAPI: true})
	_, rec := e.addPod("keep", map[string]string{shaping.AnnotationEgressRate: "20M"})
	veth, ifb := podnet.HostVethName("orphan", "eth0"), podnet.IFBName("orphan", "eth0")
	e.node.Exec(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "qvpeer")
	e.node.Exec(t, "ip", "link", "add", ifb, "type", "ifb")
	e.node.Exec(t, "ip", "link", "add", "qv0123456789zz", "type", "veth", "peer", "name", "qvpeer2") // not a qoscni name
	if res := e.pass(); res.GCed != 0 {
		t.Fatalf("first sighting deleted (an ADD may be in flight): %+v", res)
	}
	res := e.pass()
	if res.GCed != 2 || res.Errors != 0 {
		t.Errorf("second pass: %+v", res)
	}
	for _, l := range []string{veth, ifb} {
		if _, err := e.node.Try("ip", "link", "show", l); err == nil {
			t.Errorf("leftover %s survived", l)
		}
	}
	for _, l := range []string{rec.HostVeth, rec.Shaping.IFB, "qv0123456789zz"} {
		if _, err := e.node.Try("ip", "link", "show", l); err != nil {
			t.Errorf("%s was deleted", l)
		}
	}
	if e.metric("qoscni_agent_gc_total", "kind", "veth") != 1 || e.metric("qoscni_agent_gc_total", "kind", "ifb") != 1 {
		t.Errorf("gc metrics: veth %v ifb %v", e.metric("qoscni_agent_gc_total", "kind", "veth"), e.metric("qoscni_agent_gc_total", "kind", "ifb"))
	}
}

// A root qdisc someone else put on the pod's veth: neither drift repair
// nor a reshape replaces it; both fail, counted, and the record keeps
// what the kernel last had from qoscni.
func TestForeignRootNotReplacedByAgent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	_, rec := e.addPod("foreign", map[string]string{shaping.AnnotationIngressRate: "10M"})
	e.node.Exec(t, "tc", "qdisc", "replace", "dev", rec.HostVeth, "root", "handle", "5:", "htb")
	requireForeign := func(step string) {
		t.Helper()
		if q := e.node.Exec(t, "tc", "qdisc", "show", "dev", rec.HostVeth, "root"); !strings.Contains(q, "htb 5: root") {
			t.Fatalf("%s replaced the foreign root qdisc: %s", step, q)
		}
	}
	if d := e.diff(rec); len(d) != 1 || !strings.Contains(d[0], "htb 5:") {
		t.Errorf("CHECK does not name the foreign root: %q", d)
	}
	for i := 0; i < 2; i++ {
		if res := e.pass(); res.Repaired != 0 || res.Errors != 1 {
			t.Errorf("pass %d over a foreign root: %+v", i, res)
		}
		requireForeign("repair")
	}
	if v := e.metric("qoscni_agent_reconcile_errors_total", "op", "repair"); v != 2 {
		t.Errorf("reconcile_errors{repair} = %v, want 2", v)
	}
	// The informer sees the change some time after the update: wait for
	// the reshape it queues (a pass before that sees the old annotation,
	// and fails its repair as the passes above did).
	e.annotate("foreign", map[string]string{shaping.AnnotationIngressRate: "20M"})
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if e.metric("qoscni_agent_reshapes_total", "result", "failed") >= 1 {
			break
		}
	}
	if v := e.metric("qoscni_agent_reshapes_total", "result", "failed"); v < 1 {
		t.Errorf("reshapes{failed} = %v", v)
	}
	if res := e.pass(); res.Reshaped != 0 || res.Errors != 1 {
		t.Errorf("pass with a reshape over a foreign root: %+v", res)
	}
	requireForeign("reshape")
	if r := e.record(rec.ContainerID); ingressRate(r) != 10_000_000 {
		t.Errorf("record changed although the kernel was not: %+v", r.Shaping)
	}
}
