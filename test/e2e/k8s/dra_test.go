package k8s_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/qoscni/qoscni/internal/agent/dra"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// draCapacity is both nodes' capacity each way in the DRA step, and
// draClaim what each claim of deploy/examples/bandwidth-claim.yaml asks.
const (
	draCapacity = 1e9
	draClaim    = 400e6
)

// draStep: bandwidth the scheduler places. Both nodes offer 1 Gbit/s of
// egress; five pods each claim 400 Mbit/s through the example
// ResourceClaimTemplate: two run on each node and the fifth stays Pending
// with the scheduler saying why; a pod without a claim still runs on a
// full node; a claimed pod keeps 0.95 of its 400M against a saturating
// neighbour; the agent killed keeps every grant, and after it is back,
// deleting a claimed pod releases its grant and lets the fifth start.
func (e *env) draStep(t *testing.T) {
	// The guarantees step's pods hold requests the scheduler never saw.
	for _, d := range []string{"platinum", "bronze"} {
		_ = e.cp.Client.AppsV1().Deployments("default").Delete(ctx(t), d, metav1.DeleteOptions{})
	}
	e.setNodeCapacity(t, "1G")
	waitFor(t, 60*time.Second, "both nodes' ResourceSlices offer 1G each way", func() error {
		got, err := e.bandwidthSlices(t)
		if err != nil {
			return err
		}
		for _, n := range []string{nodeName, node2Name} {
			if got[n] != "egress=1G,ingress=1G" {
				return fmt.Errorf("slices %v", got)
			}
		}
		return nil
	})

	tmpl, example := exampleClaim(t, filepath.Join(e.repo, "deploy", "examples", "bandwidth-claim.yaml"))
	if _, err := e.cp.Client.ResourceV1().ResourceClaimTemplates("default").Create(ctx(t), tmpl, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := 1; i <= 5; i++ {
		name := fmt.Sprintf("claimed-%d", i)
		names = append(names, name)
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{"app": name, "dra": "claimed"}},
			Spec:       workloadPodSpec(),
		}
		p.Spec.ResourceClaims = example.Spec.Template.Spec.ResourceClaims
		p.Spec.Containers[0].Resources.Claims = example.Spec.Template.Spec.Containers[0].Resources.Claims
		if _, err := e.cp.Client.CoreV1().Pods("default").Create(ctx(t), p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { e.deleteClaimed(t, names) })

	var running map[string]*corev1.Pod
	var pending string
	t.Run("four-placed-fifth-pending", func(t *testing.T) {
		waitFor(t, 120*time.Second, "four claimed pods Ready, one Pending", func() error {
			var err error
			running, pending, err = e.claimedPods(t)
			if err == nil && (len(running) != 4 || pending == "") {
				err = fmt.Errorf("running %d, pending %q", len(running), pending)
			}
			return err
		})
		perNode := map[string]int{}
		for _, p := range running {
			perNode[p.Spec.NodeName]++
		}
		if perNode[nodeName] != 2 || perNode[node2Name] != 2 {
			t.Errorf("claimed pods per node %v, want two on each", perNode)
		}
		waitFor(t, 30*time.Second, pending+": the scheduler's reason", func() error {
			evs, err := e.cp.Client.CoreV1().Events("default").List(ctx(t), metav1.ListOptions{FieldSelector: "involvedObject.name=" + pending})
			if err != nil {
				return err
			}
			for _, ev := range evs.Items {
				// Kubernetes 1.37's scheduler names the claims it could not
				// allocate, not the capacity (docs/dra.md shows how to see it).
				if ev.Reason == "FailedScheduling" && strings.Contains(ev.Message, "2 cannot allocate all claims") {
					t.Logf("%s: %s: %s", pending, ev.Reason, ev.Message)
					return nil
				}
			}
			return fmt.Errorf("%d events", len(evs.Items))
		})
		for _, p := range running {
			e.checkClaimed(t, p)
		}
	})
	if t.Failed() {
		return
	}

	t.Run("best-effort-runs-on-a-full-node", func(t *testing.T) {
		e.createDeployment(t, deployment("neighbour", nil, nil))
		_, rec := e.runningPod(t, "neighbour")
		if g := rec.Shaping; g != nil && g.Guarantee != nil && g.Guarantee.Egress.RequestBits != 0 {
			t.Errorf("neighbour without a claim has a request: %+v", g.Guarantee)
		}
	})

	t.Run("claim-kept-under-contention", func(t *testing.T) {
		var claimed *corev1.Pod
		for _, n := range sortedKeys(running) {
			if running[n].Spec.NodeName == nodeName {
				claimed = running[n]
				break
			}
		}
		_, neighbour := e.runningPod(t, "neighbour")
		claimedRec := e.record(t, claimed.Name)
		testnet.StartIperf3(t, podNS(t, claimedRec))
		testnet.StartIperf3(t, podNS(t, neighbour))
		// -R: the pods send, out of them (their egress).
		got := e.concurrentIperf3(t, []string{podIPv4(t, claimedRec), podIPv4(t, neighbour)}, 6, true)
		t.Logf("out of pods on %s, capacity %.0f Mbit/s: %s (claim 400M) %.1f, neighbour (none) %.1f, total %.1f Mbit/s",
			nodeName, draCapacity/1e6, claimed.Name, got[0]/1e6, got[1]/1e6, (got[0]+got[1])/1e6)
		if got[0] < 0.95*draClaim {
			t.Errorf("%s got %.1f Mbit/s, under 0.95 of its 400M claim", claimed.Name, got[0]/1e6)
		}
		if got[1] < 0.2*draCapacity {
			t.Errorf("the neighbour got %.1f Mbit/s: it did not contend", got[1]/1e6)
		}
	})

	t.Run("agent-killed-keeps-grants", func(t *testing.T) {
		before := e.grants(t)
		slicesBefore, err := e.bandwidthSlices(t)
		if err != nil {
			t.Fatal(err)
		}
		if len(before[nodeName]) != 2 || len(before[node2Name]) != 2 {
			t.Fatalf("grants before: %v", before)
		}
		// The kernel's sum of the node's egress requests: the two claims
		// on it, before the kill and after (nothing double counted).
		nodeRequests := func(when string) {
			t.Helper()
			waitFor(t, 30*time.Second, "node egress requests "+when, func() error {
				v, err := scrape(e.n.Client, e.n.IP, "qoscni_guarantee_node_requests_bytes_per_second", "", "egress")
				if err == nil && v != 2*draClaim/8 {
					err = fmt.Errorf("%.0f bytes/s, want %.0f", v, 2*draClaim/8)
				}
				return err
			})
		}
		nodeRequests("before the kill")
		e.killAgent(t)
		nodeRequests("after the restart")
		if after := e.grants(t); fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("grants after the agent's restart %v, before %v", after, before)
		}
		if s, err := e.bandwidthSlices(t); err != nil || fmt.Sprint(s) != fmt.Sprint(slicesBefore) {
			t.Errorf("slices after the restart %v %v, before %v", s, err, slicesBefore)
		}
		for _, p := range running {
			e.checkClaimed(t, p)
		}
		// The restarted driver unprepares and prepares: one claimed pod
		// deleted, its grant goes and the fifth starts with its own.
		var victim *corev1.Pod
		for _, n := range sortedKeys(running) {
			if running[n].Spec.NodeName == nodeName {
				victim = running[n]
			}
		}
		if err := e.cp.Client.CoreV1().Pods("default").Delete(ctx(t), victim.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 60*time.Second, victim.Name+"'s grant released", func() error {
			if g := e.grants(t); slices.Contains(g[nodeName], string(victim.UID)) {
				return fmt.Errorf("grants %v", g)
			}
			return nil
		})
		var fifth *corev1.Pod
		waitFor(t, 120*time.Second, pending+" Ready once room was made", func() error {
			r, _, err := e.claimedPods(t)
			if err == nil && r[pending] == nil {
				err = fmt.Errorf("%s not Ready", pending)
			}
			fifth = r[pending]
			return err
		})
		e.checkClaimed(t, fifth)
	})
}

// setNodeCapacity sets the ConfigMap's nodeCapacity and rolls the agents,
// whose install step writes it into the conflist: with the chart, as a
// Helm user does (helm upgrade with the new value: a new ConfigMap name
// rolls the DaemonSet); with kustomize, an edit of the ConfigMap and a
// restart.
func (e *env) setNodeCapacity(t *testing.T, v string) {
	t.Helper()
	if e.helm != "" {
		out := e.helmCmd(t, "upgrade", helmRelease, "deploy/helm/qoscni", "--namespace", "qoscni", "--reuse-values", "--set", "nodeCapacity="+v)
		t.Logf("helm upgrade --set nodeCapacity=%s:\n%s", v, out)
		e.kc(t, "-n", "qoscni", "rollout", "status", "daemonset/qoscni-agent", "--timeout=120s")
		return
	}
	cms, err := e.cp.Client.CoreV1().ConfigMaps("qoscni").List(ctx(t), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range cms.Items {
		cm := &cms.Items[i]
		if !strings.HasPrefix(cm.Name, "qoscni-config") {
			continue
		}
		cm.Data["nodeCapacity"] = v
		if _, err := e.cp.Client.CoreV1().ConfigMaps("qoscni").Update(ctx(t), cm, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		e.kc(t, "-n", "qoscni", "rollout", "restart", "daemonset/qoscni-agent")
		e.kc(t, "-n", "qoscni", "rollout", "status", "daemonset/qoscni-agent", "--timeout=120s")
		return
	}
	t.Fatal("no qoscni-config ConfigMap")
}

// bandwidthSlices is each node's devices in the driver's ResourceSlices:
// "egress=1G,ingress=1G" by node name. A node with two slices is an error.
func (e *env) bandwidthSlices(t *testing.T) (map[string]string, error) {
	l, err := e.cp.Client.ResourceV1().ResourceSlices().List(ctx(t), metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DefaultDriverName})
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, s := range l.Items {
		if s.Spec.NodeName == nil {
			return nil, fmt.Errorf("slice %s has no node", s.Name)
		}
		n := *s.Spec.NodeName
		if _, dup := out[n]; dup {
			return nil, fmt.Errorf("node %s has two slices", n)
		}
		var devs []string
		for _, d := range s.Spec.Devices {
			q := d.Capacity[dra.CapacityName].Value
			devs = append(devs, d.Name+"="+q.String())
		}
		out[n] = strings.Join(devs, ",")
	}
	return out, nil
}

// exampleClaim decodes deploy/examples/bandwidth-claim.yaml strictly: its
// ResourceClaimTemplate and its Deployment, whose pod wiring the step's
// pods copy.
func exampleClaim(t *testing.T, path string) (*resourcev1.ResourceClaimTemplate, *appsv1.Deployment) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	docs := strings.Split(string(b), "\n---\n")
	if len(docs) != 2 {
		t.Fatalf("%s: %d documents, want the template and the Deployment", path, len(docs))
	}
	var tmpl resourcev1.ResourceClaimTemplate
	var dep appsv1.Deployment
	if err := yaml.UnmarshalStrict([]byte(docs[0]), &tmpl); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if err := yaml.UnmarshalStrict([]byte(docs[1]), &dep); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	tmpl.Namespace = "default"
	reqs := tmpl.Spec.Spec.Devices.Requests
	if len(reqs) != 1 || reqs[0].Exactly == nil || reqs[0].Exactly.DeviceClassName != dra.Egress+"."+dra.DefaultDriverName ||
		reqs[0].Exactly.Capacity == nil {
		t.Fatalf("%s: requests %+v", path, reqs)
	}
	if q := reqs[0].Exactly.Capacity.Requests[dra.CapacityName]; q.Cmp(*resource.NewQuantity(draClaim, resource.DecimalSI)) != 0 {
		t.Fatalf("%s asks %s, the step expects 400M", path, q.String())
	}
	return &tmpl, &dep
}

// workloadPodSpec is the Deployments' pod spec without the node selector:
// the scheduler places these.
func workloadPodSpec() corev1.PodSpec {
	s := deployment("x", nil, nil).Spec.Template.Spec
	s.NodeSelector = nil
	return s
}

// claimedPods lists the step's pods: the Ready ones by name, and the one
// the scheduler could not place.
func (e *env) claimedPods(t *testing.T) (map[string]*corev1.Pod, string, error) {
	pods, err := e.cp.Client.CoreV1().Pods("default").List(ctx(t), metav1.ListOptions{LabelSelector: "dra=claimed"})
	if err != nil {
		return nil, "", err
	}
	running := map[string]*corev1.Pod{}
	pending := ""
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.DeletionTimestamp != nil {
			continue
		}
		if p.Spec.NodeName == "" {
			pending = p.Name
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				running[p.Name] = p
			}
		}
	}
	return running, pending, nil
}

// checkClaimed: the pod's claim consumed 400M of its node's egress device
// and the pod's attachment guarantees exactly that.
func (e *env) checkClaimed(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if len(p.Status.ResourceClaimStatuses) != 1 || p.Status.ResourceClaimStatuses[0].ResourceClaimName == nil {
		t.Fatalf("%s: claim statuses %+v", p.Name, p.Status.ResourceClaimStatuses)
	}
	c, err := e.cp.Client.ResourceV1().ResourceClaims("default").Get(ctx(t), *p.Status.ResourceClaimStatuses[0].ResourceClaimName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Status.Allocation == nil || len(c.Status.Allocation.Devices.Results) != 1 {
		t.Fatalf("%s: claim %s allocation %+v", p.Name, c.Name, c.Status.Allocation)
	}
	r := c.Status.Allocation.Devices.Results[0]
	used := r.ConsumedCapacity[dra.CapacityName]
	if r.Driver != dra.DefaultDriverName || r.Pool != p.Spec.NodeName || r.Device != dra.Egress || used.Value() != draClaim {
		t.Errorf("%s: claim %s allocated %s/%s/%s consuming %s", p.Name, c.Name, r.Driver, r.Pool, r.Device, used.String())
	}
	var rec *state.Record
	waitFor(t, 10*time.Second, p.Name+"'s record", func() error {
		if p.Spec.NodeName == nodeName {
			rec = e.record(t, p.Name)
		} else {
			rec = e.recordOn(t, p.Name)
		}
		if rec == nil {
			return fmt.Errorf("none on %s", p.Spec.NodeName)
		}
		return nil
	})
	if rec.Shaping == nil || rec.Shaping.Guarantee == nil || rec.Shaping.Guarantee.Egress.RequestBits != draClaim {
		t.Errorf("%s on %s: shaping %+v, want an egress request of 400M from its claim", p.Name, p.Spec.NodeName, rec.Shaping)
	}
}

// grants lists the pod UIDs with a DRA grant on each node.
func (e *env) grants(t *testing.T) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, n := range []struct {
		name string
		try  func(args ...string) (string, error)
	}{{nodeName, e.tryHere}, {node2Name, e.tryOn}} {
		ls, err := n.try("sh", "-c", "ls -1 "+paths.GrantDir+" 2>/dev/null || true")
		if err != nil {
			t.Fatalf("%s: %v %s", n.name, err, ls)
		}
		out[n.name] = strings.Fields(ls)
		slices.Sort(out[n.name])
	}
	return out
}

// killAgent kills the first node's agent with SIGKILL (no cleanup of its
// own) and waits for the kubelet to restart it and for it to be Ready.
func (e *env) killAgent(t *testing.T) {
	t.Helper()
	agentPod := func() (*corev1.Pod, error) {
		pods, err := e.cp.Client.CoreV1().Pods("qoscni").List(ctx(t), metav1.ListOptions{FieldSelector: "spec.nodeName=" + nodeName})
		if err != nil {
			return nil, err
		}
		if len(pods.Items) != 1 {
			return nil, fmt.Errorf("%d agent pods on %s", len(pods.Items), nodeName)
		}
		return &pods.Items[0], nil
	}
	p, err := agentPod()
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Status.ContainerStatuses) != 1 {
		t.Fatalf("agent container statuses %+v", p.Status.ContainerStatuses)
	}
	restarts := p.Status.ContainerStatuses[0].RestartCount
	id := strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://")
	var info struct {
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(e.ctd.Crictl(t, "inspect", "-o", "json", id)), &info); err != nil || info.Info.Pid == 0 {
		t.Fatalf("crictl inspect %s: %v", id, err)
	}
	if err := syscall.Kill(info.Info.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 120*time.Second, "agent restarted and Ready", func() error {
		p, err := agentPod()
		if err != nil {
			return err
		}
		s := p.Status.ContainerStatuses
		if len(s) != 1 || s[0].RestartCount == restarts || !s[0].Ready {
			return fmt.Errorf("agent %+v", s)
		}
		return nil
	})
	t.Logf("agent of %s killed (pid %d) and back", nodeName, info.Info.Pid)
}

// deleteClaimed deletes the step's pods, the neighbour and the template,
// and waits until every grant is released on both nodes.
func (e *env) deleteClaimed(t *testing.T, names []string) {
	for _, n := range names {
		_ = e.cp.Client.CoreV1().Pods("default").Delete(ctx(t), n, metav1.DeleteOptions{})
	}
	_ = e.cp.Client.AppsV1().Deployments("default").Delete(ctx(t), "neighbour", metav1.DeleteOptions{})
	_ = e.cp.Client.ResourceV1().ResourceClaimTemplates("default").Delete(ctx(t), "egress-400m", metav1.DeleteOptions{})
	waitFor(t, 90*time.Second, "every grant released", func() error {
		if g := e.grants(t); len(g[nodeName])+len(g[node2Name]) > 0 {
			return fmt.Errorf("grants %v", g)
		}
		return nil
	})
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
