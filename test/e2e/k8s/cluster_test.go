package k8s_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/qoscni/qoscni/internal/agent/install"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/e2e/cluster"
	"github.com/qoscni/qoscni/test/e2e/containerd"
	"github.com/qoscni/qoscni/test/e2e/images"
	"github.com/qoscni/qoscni/test/e2e/node"
)

const (
	node2Name = "e2e-node2"
	// nodePort is the NodePort of the echo Service, reached from outside.
	nodePort = 30900
	// servicePort is every test Service's port (to the workload's TCP).
	servicePort = 80
)

// startSecondNode brings up the second node: its own network and mount
// namespaces, containerd 2 (the first node keeps Debian's 1.6, as during
// an upgrade), a kubelet and a kube-proxy.
func (e *env) startSecondNode(t *testing.T, qoscniTar, corednsTar string) {
	e.n2 = node.Second(t, node.NewSpawner(t))
	e.ctd2 = containerd.Start(t, containerd.Options{Version: 2, Exec: e.n2.Exec, CNIBinDir: install.CNIBinDir, CNIConfDir: install.CNIConfDir})
	e.ctd2.Import(t, qoscniTar, corednsTar)
	e.cp.StartKubelet(t, cluster.KubeletOptions{NodeName: node2Name, NodeIP: e.n2.IP, RuntimeEndpoint: "unix://" + e.ctd2.Address,
		Exec: e.n2.Exec, ClusterDNS: clusterDNS})
	e.cp.StartKubeProxy(t, cluster.KubeProxyOptions{NodeName: node2Name, NodeIP: e.n2.IP, Mode: proxyMode(),
		ClusterCIDRs: []string{clusterCIDR4, clusterCIDR6}, Exec: e.n2.Exec})
}

// on runs a command on the second node (its namespaces) and returns its
// combined output.
func (e *env) on(t *testing.T, args ...string) string {
	t.Helper()
	out, err := e.tryOn(args...)
	if err != nil {
		t.Fatalf("on %s: %s: %v\n%s", node2Name, strings.Join(args, " "), err, out)
	}
	return out
}

func (e *env) tryOn(args ...string) (string, error) {
	cmd := append(append([]string{}, e.n2.Exec...), args...)
	out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
	return string(out), err
}

// recordOn is the attachment record of a pod of the second node, read in
// that node's mount namespace; nil if none.
func (e *env) recordOn(t *testing.T, pod string) *state.Record {
	t.Helper()
	return e.recordOnIn(t, "default", pod)
}

// recordOnIn is recordOn for a pod of namespace ns.
func (e *env) recordOnIn(t *testing.T, ns, pod string) *state.Record {
	t.Helper()
	dir := filepath.Join(install.StateDir, networkName)
	out, err := e.tryOn("sh", "-c", "cat "+dir+"/*.json 2>/dev/null || true")
	if err != nil {
		t.Fatalf("records on %s: %v %s", node2Name, err, out)
	}
	dec := json.NewDecoder(strings.NewReader(out))
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err == io.EOF {
			return nil
		} else if err != nil {
			t.Fatalf("records on %s: %v", node2Name, err)
		}
		r, err := state.Decode(raw)
		if err == nil && r.Pod.Name == pod && r.Pod.Namespace == ns && !r.Provisional {
			return r
		}
	}
}

// podRunner runs commands in a pod's network namespace, on either node.
type podRunner struct {
	prefix []string // the node's command prefix
	netns  string   // the netns name (containerd's, under /run/netns)
}

func (p podRunner) Try(name string, args ...string) (string, error) {
	cmd := append(append([]string{}, p.prefix...), append([]string{"ip", "netns", "exec", p.netns, name}, args...)...)
	out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
	return string(out), err
}

// tcpLine connects from r to addr:port and returns the workload's line.
func tcpLine(r interface {
	Try(string, ...string) (string, error)
}, addr string, port int) (string, error) {
	// timeout bounds the connect too: a SYN whose SYN-ACK is dropped is
	// retried for two minutes.
	return r.Try("timeout", "4", "bash", "-c", "exec 3<>/dev/tcp/"+addr+"/"+strconv.Itoa(port)+" && head -n1 <&3")
}

// expectFrom retries tcpLine for a while: kube-proxy programs a new
// Service within a sync period.
func expectFrom(t *testing.T, what string, r interface {
	Try(string, ...string) (string, error)
}, addr string, port int, pod string) {
	t.Helper()
	var out string
	var err error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
		if out, err = tcpLine(r, addr, port); err == nil && strings.HasPrefix(out, pod+" ") {
			t.Logf("%s: %s:%d answered by %s", what, addr, port, strings.TrimSpace(out))
			return
		}
	}
	t.Errorf("%s: %s:%d: %q %v (want a line from %s)", what, addr, port, out, err, pod)
}

// deploymentOn is deployment pinned to one node.
func deploymentOn(nodeName, name string, annotations map[string]string, ports []corev1.ContainerPort) *appsv1.Deployment {
	d := deployment(name, annotations, ports)
	d.Spec.Template.Spec.NodeSelector = map[string]string{corev1.LabelHostname: nodeName}
	return d
}

func service(name, app string, typ corev1.ServiceType, nodePort int32) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Type:     typ,
			Selector: map[string]string{"app": app},
			Ports: []corev1.ServicePort{{Name: "tcp", Port: servicePort, TargetPort: intstr.FromInt32(images.WorkloadTCPPort),
				Protocol: corev1.ProtocolTCP, NodePort: nodePort}},
		},
	}
}

func (e *env) createService(t *testing.T, s *corev1.Service) string {
	t.Helper()
	got, err := e.cp.Client.CoreV1().Services("default").Create(ctx(t), s, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got.Spec.ClusterIP
}

func (e *env) createDeployment(t *testing.T, d *appsv1.Deployment) {
	t.Helper()
	if _, err := e.cp.Client.AppsV1().Deployments("default").Create(ctx(t), d, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// readyPod waits for the app's pod to be Ready and returns it (any node).
func (e *env) readyPod(t *testing.T, app string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	waitFor(t, 90*time.Second, app+" pod Ready", func() error {
		pods, err := e.cp.Client.CoreV1().Pods("default").List(ctx(t), metav1.ListOptions{LabelSelector: "app=" + app})
		if err != nil {
			return err
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			for _, c := range p.Status.Conditions {
				if p.DeletionTimestamp == nil && c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
					pod = p
					return nil
				}
			}
		}
		return fmt.Errorf("%d pods, none Ready", len(pods.Items))
	})
	return pod
}

// clusterDNSStep deploys CoreDNS as kube-dns, the way kubeadm does.
func (e *env) clusterDNSStep(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(e.repo, "test", "e2e", "k8s", "testdata", "coredns.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	manifest := strings.NewReplacer("IMAGE", e.corednsRef, "CLUSTER_DNS", clusterDNS).Replace(string(raw))
	path := filepath.Join(t.TempDir(), "coredns.yaml")
	if err := os.WriteFile(path, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	e.kc(t, "apply", "-f", path)
	d := waitFor(t, 90*time.Second, "CoreDNS Ready", func() error {
		dep, err := e.cp.Client.AppsV1().Deployments("kube-system").Get(ctx(t), "coredns", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if dep.Status.ReadyReplicas != 1 {
			return fmt.Errorf("ready %d", dep.Status.ReadyReplicas)
		}
		return nil
	})
	t.Logf("timing: CoreDNS Ready %v after apply", d.Round(time.Millisecond))
}

// Pods of the Service tests: a client and an echo server on the first
// node (one bridge), an echo server on the second.
var (
	client1, echo1, echo2 *corev1.Pod
	client1NS             *testnet.NS
	echo1IP, echo2IP      string // Service ClusterIPs
	selfIP                string
)

// servicesStep: ClusterIP Services through kube-proxy, cluster DNS, each
// case a named subtest.
func (e *env) servicesStep(t *testing.T) {
	e.createDeployment(t, deploymentOn(nodeName, "client1", nil, nil))
	e.createDeployment(t, deploymentOn(nodeName, "echo1", nil, nil))
	e.createDeployment(t, deploymentOn(node2Name, "echo2", nil, nil))
	echo1IP = e.createService(t, service("echo1", "echo1", corev1.ServiceTypeClusterIP, 0))
	echo2IP = e.createService(t, service("echo2", "echo2", corev1.ServiceTypeClusterIP, 0))
	selfIP = e.createService(t, service("self", "client1", corev1.ServiceTypeClusterIP, 0))
	client1, echo1, echo2 = e.readyPod(t, "client1"), e.readyPod(t, "echo1"), e.readyPod(t, "echo2")
	if echo2.Spec.NodeName != node2Name || echo1.Spec.NodeName != nodeName {
		t.Fatalf("pods on %s and %s, want %s and %s", echo1.Spec.NodeName, echo2.Spec.NodeName, nodeName, node2Name)
	}
	rec := e.record(t, client1.Name)
	if rec == nil {
		t.Fatalf("no record of %s", client1.Name)
	}
	client1NS = podNS(t, rec)

	t.Run("same-node-same-bridge", func(t *testing.T) {
		expectFrom(t, "client1 -> Service echo1 (endpoint on its bridge)", client1NS, echo1IP, servicePort, echo1.Name)
	})
	t.Run("other-node", func(t *testing.T) {
		expectFrom(t, "client1 -> Service echo2 (endpoint on the other node)", client1NS, echo2IP, servicePort, echo2.Name)
	})
	t.Run("hairpin-own-service", func(t *testing.T) {
		expectFrom(t, "client1 -> its own Service", client1NS, selfIP, servicePort, client1.Name)
	})
	t.Run("dns", func(t *testing.T) {
		// The kubelet gave the pod the cluster DNS and its search path;
		// short names are resolved through it, as the pod's resolver does.
		resolv := e.podFile(t, client1, "/etc/resolv.conf")
		if !strings.Contains(resolv, "nameserver "+clusterDNS) || !strings.Contains(resolv, "default.svc.cluster.local") {
			t.Fatalf("pod resolv.conf:\n%s", resolv)
		}
		for name, want := range map[string]string{"kubernetes.default": cluster.ServiceIP, "echo1": echo1IP} {
			got, fqdn, err := resolveIn(client1NS.Path, resolv, name)
			if err != nil || got != want {
				t.Errorf("resolve %s from %s through %s: %q %v, want %s", name, client1.Name, clusterDNS, got, err, want)
				continue
			}
			t.Logf("%s (%s) -> %s (CoreDNS at %s, from pod %s)", name, fqdn, got, clusterDNS, client1.Name)
		}
	})
}

// podFile reads a file of the pod's first container through its root.
func (e *env) podFile(t *testing.T, pod *corev1.Pod, path string) string {
	t.Helper()
	id := ""
	for _, s := range pod.Status.ContainerStatuses {
		id = strings.TrimPrefix(s.ContainerID, "containerd://")
	}
	out := e.ctd.Crictl(t, "inspect", "-o", "json", id)
	var info struct {
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || info.Info.Pid == 0 {
		t.Fatalf("crictl inspect %s: %v", id, err)
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(info.Info.Pid), "root", path))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// resolveIn asks the cluster DNS Service from inside a pod's network
// namespace, as the pod's resolver does with its resolv.conf: a name with
// fewer dots than ndots is tried with each search domain first.
func resolveIn(netnsPath, resolvConf, name string) (addr, fqdn string, err error) {
	var search []string
	ndots := 1
	for _, l := range strings.Split(resolvConf, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) > 1 && f[0] == "search":
			search = f[1:]
		case len(f) > 1 && f[0] == "options":
			for _, o := range f[1:] {
				if v, ok := strings.CutPrefix(o, "ndots:"); ok {
					ndots, _ = strconv.Atoi(v)
				}
			}
		}
	}
	var tries []string
	if strings.Count(name, ".") < ndots {
		for _, d := range search {
			tries = append(tries, name+"."+d+".")
		}
	}
	tries = append(tries, name+".")
	err = testnet.InNS(netnsPath, func() error {
		r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "udp", net.JoinHostPort(clusterDNS, "53"))
		}}
		var last error
		for _, q := range tries {
			c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			addrs, err := r.LookupHost(c, q)
			cancel()
			if err == nil {
				addr, fqdn = strings.Join(addrs, ","), q
				return nil
			}
			last = err
		}
		return last
	})
	return addr, fqdn, err
}

// nodePortStep: a NodePort reached from outside the nodes on both of
// them, and a hostPort and a NodePort on the same node both work.
func (e *env) nodePortStep(t *testing.T) {
	e.createService(t, service("echo1-np", "echo1", corev1.ServiceTypeNodePort, nodePort))
	t.Run("from-outside", func(t *testing.T) {
		for _, ip := range []string{e.n.IP, e.n2.IP} {
			expectFrom(t, "client netns -> NodePort on "+ip, e.n.Client, ip, nodePort, echo1.Name)
		}
	})
	t.Run("hostport-and-nodeport-same-node", func(t *testing.T) {
		expectFrom(t, "client netns -> hostPort", e.n.Client, e.n.IP, shapedHostTCP, shaped.Name)
		expectFrom(t, "client netns -> NodePort", e.n.Client, e.n.IP, nodePort, echo1.Name)
	})
}

// acrossNodesStep: a pod of the second node shaped in both directions for
// traffic from the first node, and reshaped live there.
func (e *env) acrossNodesStep(t *testing.T) {
	e.createDeployment(t, deploymentOn(node2Name, "shaped2", map[string]string{
		"kubernetes.io/ingress-bandwidth": "10M",
		"kubernetes.io/egress-bandwidth":  "20M",
	}, nil))
	pod := e.readyPod(t, "shaped2")
	var rec *state.Record
	waitFor(t, 10*time.Second, "record of "+pod.Name+" on "+node2Name, func() error {
		if rec = e.recordOn(t, pod.Name); rec == nil {
			return fmt.Errorf("none yet")
		}
		return nil
	})
	pr := podRunner{prefix: e.n2.Exec, netns: filepath.Base(rec.Netns)}
	e.startIperf3On(t, pr)
	ip := pod.Status.PodIP
	t.Run("shaping-both-directions", func(t *testing.T) {
		for _, c := range []struct {
			dir     string
			rate    float64
			reverse bool
		}{{"ingress", 10e6, false}, {"egress", 20e6, true}} {
			r := measure(t, e.n.NetNS, ip, 5, c.reverse)
			t.Logf("%s across nodes: steady %.2f Mbit/s (%.3fx)", c.dir, r.steady/1e6, r.steady/c.rate)
			if r.steady < 0.85*c.rate || r.steady > 1.05*c.rate {
				t.Errorf("%s across nodes: %.2f Mbit/s, want 0.85-1.05x of %.0f", c.dir, r.steady/1e6, c.rate/1e6)
			}
		}
	})
	t.Run("reshape-on-second-node", func(t *testing.T) {
		e.kc(t, "annotate", "--overwrite", "pod", pod.Name, "kubernetes.io/ingress-bandwidth=5M")
		d := waitFor(t, 10*time.Second, "ingress reshaped to 5M on "+node2Name, func() error {
			q, err := e.tryOn("tc", "qdisc", "show", "dev", rec.HostVeth)
			if err != nil || !strings.Contains(q, "rate 5Mbit") {
				return fmt.Errorf("qdisc: %s %v", q, err)
			}
			return nil
		})
		t.Logf("timing: annotate -> %s's kernel at 5M in %v", node2Name, d.Round(time.Millisecond))
		r := measure(t, e.n.NetNS, ip, 4, false)
		if r.steady > 5.5e6 {
			t.Errorf("ingress after the reshape: %.2f Mbit/s, want at most 5.5", r.steady/1e6)
		}
	})
}

func (e *env) startIperf3On(t *testing.T, pr podRunner) {
	t.Helper()
	cmd := append(append([]string{}, pr.prefix...), "ip", "netns", "exec", pr.netns, "iperf3", "-s", "--bind", "0.0.0.0")
	c := exec.Command(cmd[0], cmd[1:]...)
	var buf bytes.Buffer
	c.Stdout, c.Stderr = &buf, &buf
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	e.top.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
	waitFor(t, 5*time.Second, "iperf3 server in the second node's pod", func() error {
		out, err := pr.Try("ss", "-ltn", "sport = :5201")
		if err != nil || !strings.Contains(out, "5201") {
			return fmt.Errorf("%v %s %s", err, out, buf.String())
		}
		return nil
	})
}

// bridgeNetfilterStep: the same-bridge Service case needs
// bridge-nf-call-iptables; with 0 in the first node's namespace the reply
// bypasses conntrack and the connection fails; with 1 it works. Proof
// that the Service test sees the mechanism it is about. (The plugin sets
// it back to 1 on ADD and STATUS: no pod starts on this node meanwhile,
// and containerd 1.6 does not call STATUS.)
func (e *env) bridgeNetfilterStep(t *testing.T) {
	const path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
	if err := os.WriteFile(path, []byte("0"), 0o644); err != nil {
		t.Fatal(err)
	}
	restore := func() { _ = os.WriteFile(path, []byte("1"), 0o644) }
	defer restore()
	// conntrack keeps an established flow's translation: new connections
	// only, each from a new source port.
	fails := 0
	for i := 0; i < 3; i++ {
		if out, err := tcpLine(client1NS, echo1IP, servicePort); err != nil || !strings.HasPrefix(out, echo1.Name+" ") {
			fails++
		}
	}
	if fails != 3 {
		t.Errorf("with bridge-nf-call-iptables=0, %d of 3 connections to a Service on the same bridge failed; want all", fails)
	}
	restore()
	expectFrom(t, "with bridge-nf-call-iptables=1 again", client1NS, echo1IP, servicePort, echo1.Name)
}
