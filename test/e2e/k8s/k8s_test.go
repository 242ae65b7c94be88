// Package k8s_test runs qoscni the way users run it: a two-node
// Kubernetes (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler; per node a kubelet and kube-proxy, over containerd 1.6 on
// the first and containerd 2 on the second; CoreDNS), all built from the Go
// module proxy by test/e2e/build.sh, each node in namespaces of its own
// (test/e2e/node), with qoscni installed by `kubectl apply -k deploy/`.
// Run with `make e2e-k8s` or `make e2e-k8s-iptables` (QOSCNI_E2E_K8S=1);
// without it the tests skip.
package k8s_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/qoscni/qoscni/internal/agent/install"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/e2e/cluster"
	"github.com/qoscni/qoscni/test/e2e/containerd"
	"github.com/qoscni/qoscni/test/e2e/images"
	"github.com/qoscni/qoscni/test/e2e/node"
)

func TestMain(m *testing.M) { node.Main(m, "QOSCNI_E2E_K8S") }

const (
	nodeName = "e2e-node"
	// The controller-manager gives the node a /24 and a /64 of these.
	clusterCIDR4 = "10.244.0.0/16"
	clusterCIDR6 = "fd00:10:244::/56"
	networkName  = "qoscni" // deploy/base/config/standalone.json
	// clusterDNS is the kube-dns Service's address, in cluster.ServiceCIDR.
	clusterDNS    = "10.0.0.10"
	shapedHostTCP = 30080
	shapedHostUDP = 30081
)

// env is the running cluster the scenarios share, in order.
type env struct {
	n   *node.Node
	cp  *cluster.ControlPlane
	ctd *containerd.Containerd
	// The second node, on containerd 2.
	n2         *node.Node
	ctd2       *containerd.Containerd
	corednsRef string
	kubectl    string
	// helm is the helm CLI when the run installs with the chart
	// (installer helm), "" when with kustomize.
	helm     string
	helmHome string
	repo     string
	store    *state.Store
	// top is TestKubernetes' own t: what outlives one scenario (the
	// shaped pod's iperf3 server) is cleaned up with it.
	top *testing.T
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// TestKubernetes is one cluster and the scenarios as subtests, in
// order: each builds on the state the previous left.
func TestKubernetes(t *testing.T) {
	n := node.Get(t)
	testnet.RequireRoot(t)
	began := time.Now()
	e := &env{n: n, repo: repoRoot(), store: state.New(install.StateDir), top: t}
	e.kubectl = cluster.Binary(t, "kubectl")
	if installer() == "helm" {
		e.helm = cluster.Binary(t, "helm")
		e.helmHome = t.TempDir()
	}

	e.cp = cluster.StartControlPlaneWith(t, cluster.Options{AdvertiseAddress: n.IP, BindAddress: "0.0.0.0", ServiceAccounts: true})
	e.cp.StartControllerManager(t, clusterCIDR4, clusterCIDR6)
	e.cp.StartScheduler(t)
	e.ctd = containerd.Start(t, containerd.Options{CNIBinDir: install.CNIBinDir, CNIConfDir: install.CNIConfDir})
	qoscniTar := qoscniImage(t)
	corednsTar, corednsRef := images.CoreDNS(t)
	e.corednsRef = corednsRef
	e.ctd.Import(t, qoscniTar, corednsTar)
	e.cp.StartKubelet(t, cluster.KubeletOptions{NodeName: nodeName, NodeIP: n.IP, RuntimeEndpoint: "unix://" + e.ctd.Address,
		ClusterDNS: clusterDNS})
	e.cp.StartKubeProxy(t, cluster.KubeProxyOptions{NodeName: nodeName, NodeIP: n.IP, Mode: proxyMode(),
		ClusterCIDRs: []string{clusterCIDR4, clusterCIDR6}})
	e.startSecondNode(t, qoscniTar, corednsTar)
	t.Logf("timing: cluster up in %v", time.Since(began).Round(time.Millisecond))

	steps := []struct {
		name string
		run  func(*testing.T)
	}{
		{"1-install", e.install},
		{"2-cluster-dns", e.clusterDNSStep},
		{"3-services", e.servicesStep},
		{"4-shaped-deployment", e.shapedDeployment},
		{"5-nodeport", e.nodePortStep},
		{"6-reshape-live", e.reshape},
		{"7-prometheus", e.prometheus},
		{"8-unannotated-not-shaped", e.unshaped},
		{"9-across-nodes", e.acrossNodesStep},
		{"10-bridge-netfilter-proof", e.bridgeNetfilterStep},
		{"11-guarantees", e.guaranteesStep},
		{"12-dra", e.draStep},
		{"13-controls", e.controlsStep},
		{"14-kubectl-qoscni", e.kubectlPluginStep},
		{"15-network-policy", e.networkPolicyStep},
		{"16-delete-and-uninstall", e.deleteAndUninstall},
	}
	for _, s := range steps {
		start := time.Now()
		ok := t.Run(s.name, s.run)
		t.Logf("timing: %s %v", s.name, time.Since(start).Round(time.Millisecond))
		if !ok {
			break // the next ones build on it
		}
	}
}

// installer is how the run installs qoscni: the Helm chart
// (deploy/helm/qoscni, make e2e-k8s) unless QOSCNI_E2E_INSTALL says
// kustomize (deploy/, make e2e-k8s-iptables). Both are what docs/install.md
// tells users to run.
func installer() string {
	if i := os.Getenv("QOSCNI_E2E_INSTALL"); i != "" {
		return i
	}
	return "helm"
}

// helmRelease is the release and namespace the chart is installed as.
const helmRelease = "qoscni"

// chartCeilings is what the helm run sets as the chart's ceilings: the
// default delay budget ceiling, so that nothing else changes, written
// into the conflist by the install.
const chartCeilings = "maxQueueDelay=100ms"

// proxyMode is kube-proxy's mode for the run: nftables unless
// QOSCNI_E2E_PROXY_MODE says iptables (make e2e-k8s-iptables).
func proxyMode() string {
	if m := os.Getenv("QOSCNI_E2E_PROXY_MODE"); m != "" {
		return m
	}
	return "nftables"
}

// qoscniImage builds the plugin and agent as `make image` does and returns
// the image tarball (qoscni/qoscni:dev, what deploy/ runs).
func qoscniImage(t *testing.T) string {
	dir := t.TempDir()
	root := repoRoot()
	// The agent's tags are the Makefile's AGENT_TAGS.
	for _, c := range []struct{ out, pkg, tags string }{
		{install.PluginBinary, "./cmd/qoscni", ""},
		{install.AgentBinary, "./cmd/qoscni-agent", "grpcnotrace"},
	} {
		run(t, root, []string{"CGO_ENABLED=0"}, "go", "build", "-tags", c.tags, "-trimpath", "-ldflags", "-s -w", "-o", filepath.Join(dir, c.out), c.pkg)
	}
	tar := filepath.Join(dir, "qoscni-image.tar")
	run(t, root, nil, "go", "run", "./cmd/qoscni-image", "-o", tar, "--tag", "qoscni/qoscni:dev",
		"--plugin", filepath.Join(dir, install.PluginBinary), "--agent", filepath.Join(dir, install.AgentBinary))
	return tar
}

func run(t *testing.T, dir string, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (e *env) kc(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, e.repo, nil, e.kubectl, append([]string{"--kubeconfig", e.cp.Kubeconfig}, args...)...)
}

// helmCmd runs the helm CLI against the cluster, with its cache and config
// in the test's own directory.
func (e *env) helmCmd(t *testing.T, args ...string) string {
	t.Helper()
	env := []string{"HELM_CACHE_HOME=" + filepath.Join(e.helmHome, "cache"), "HELM_CONFIG_HOME=" + filepath.Join(e.helmHome, "config"),
		"HELM_DATA_HOME=" + filepath.Join(e.helmHome, "data")}
	return run(t, e.repo, env, e.helm, append([]string{"--kubeconfig", e.cp.Kubeconfig}, args...)...)
}

// waitFor polls cond every 250 ms until it returns nil or timeout.
// nftSetCovers reports whether the elements of an interval set, as `nft
// list set` prints them (prefixes, ranges, addresses; the kernel merges
// adjacent ones, so two nodes' /24s show as one /23), cover all of cidr.
func nftSetCovers(listing, cidr string) bool {
	want, err := netip.ParsePrefix(cidr)
	if err != nil {
		return false
	}
	first, last := want.Masked().Addr(), lastAddr(want)
	_, elems, ok := strings.Cut(listing, "elements = {")
	if !ok {
		return false
	}
	elems, _, _ = strings.Cut(elems, "}")
	for _, e := range strings.Split(elems, ",") {
		e = strings.TrimSpace(e)
		lo, hi := netip.Addr{}, netip.Addr{}
		if a, b, isRange := strings.Cut(e, "-"); isRange {
			lo, _ = netip.ParseAddr(strings.TrimSpace(a))
			hi, _ = netip.ParseAddr(strings.TrimSpace(b))
		} else if p, err := netip.ParsePrefix(e); err == nil {
			lo, hi = p.Masked().Addr(), lastAddr(p)
		} else if a, err := netip.ParseAddr(e); err == nil {
			lo, hi = a, a
		}
		if lo.IsValid() && hi.IsValid() && lo.Compare(first) <= 0 && hi.Compare(last) >= 0 {
			return true
		}
	}
	return false
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() error) time.Duration {
	t.Helper()
	start := time.Now()
	var err error
	for time.Since(start) < timeout {
		if err = cond(); err == nil {
			return time.Since(start)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("%s: not after %v: %v", what, timeout, err)
	return 0
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// 1. kubectl apply -k deploy/: the install init container writes the
// conflist (with the Node's podCIDRs) and the binary, the agent is Ready,
// and so is the node.
func (e *env) install(t *testing.T) {
	// containerd runs the reference loopback plugin for every pod's lo,
	// from its CNI bin dir: on a real node the CNI plugins package
	// (kubeadm's kubernetes-cni) put it there; here Debian's stands in.
	lo, err := os.ReadFile("/usr/lib/cni/loopback")
	if err != nil {
		t.Fatalf("reference loopback plugin (apt-get install containernetworking-plugins): %v", err)
	}
	if err := os.WriteFile(filepath.Join(install.CNIBinDir, "loopback"), lo, 0o755); err != nil {
		t.Fatal(err)
	}
	e.on(t, "install", "-m", "0755", "/usr/lib/cni/loopback", filepath.Join(install.CNIBinDir, "loopback"))
	if e.helm != "" {
		// As docs/install.md says: the namespace, labelled for Pod
		// Security, then the chart.
		e.kc(t, "create", "namespace", "qoscni")
		e.kc(t, "label", "namespace", "qoscni", "pod-security.kubernetes.io/enforce=privileged")
		out := e.helmCmd(t, "install", helmRelease, "deploy/helm/qoscni", "--namespace", "qoscni", "--set", "ceilings."+chartCeilings)
		t.Logf("helm install:\n%s", out)
	} else {
		e.kc(t, "apply", "-k", "deploy/")
	}
	d := waitFor(t, 90*time.Second, "qoscni-agent DaemonSet ready", func() error {
		ds, err := e.cp.Client.AppsV1().DaemonSets("qoscni").Get(ctx(t), "qoscni-agent", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.DesiredNumberScheduled != 2 || ds.Status.NumberReady != 2 {
			return fmt.Errorf("desired %d ready %d", ds.Status.DesiredNumberScheduled, ds.Status.NumberReady)
		}
		return nil
	})
	t.Logf("timing: agent Ready %v after apply", d.Round(time.Millisecond))
	for _, name := range []string{nodeName, node2Name} {
		waitFor(t, 60*time.Second, name+" Ready", func() error {
			nd, err := e.cp.Client.CoreV1().Nodes().Get(ctx(t), name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			for _, c := range nd.Status.Conditions {
				if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
					return nil
				}
			}
			return fmt.Errorf("conditions %v", nd.Status.Conditions)
		})
	}
	conf, err := os.ReadFile(filepath.Join(install.CNIConfDir, install.ConflistName))
	if err != nil {
		t.Fatalf("installed conflist: %v", err)
	}
	nd, err := e.cp.Client.CoreV1().Nodes().Get(ctx(t), nodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range nd.Spec.PodCIDRs {
		if !strings.Contains(string(conf), c) {
			t.Errorf("conflist does not carry the Node's podCIDR %s:\n%s", c, conf)
		}
	}
	if e.helm != "" {
		var list struct {
			Plugins []struct {
				Type     string            `json:"type"`
				Ceilings map[string]string `json:"ceilings"`
			} `json:"plugins"`
		}
		_ = json.Unmarshal(conf, &list)
		k, v, _ := strings.Cut(chartCeilings, "=")
		if len(list.Plugins) == 0 || list.Plugins[0].Type != install.PluginType || list.Plugins[0].Ceilings[k] != v {
			t.Errorf("conflist does not carry the chart's ceilings %s:\n%s", chartCeilings, conf)
		}
	}
	if fi, err := os.Stat(filepath.Join(install.CNIBinDir, install.PluginBinary)); err != nil || fi.Mode()&0o111 == 0 {
		t.Errorf("plugin binary not installed: %v", err)
	}
	// Standalone: the agent runs with pod routes (deploy/overlays/standalone)
	// and keeps the cluster's pod CIDRs out of masquerade.
	waitFor(t, 30*time.Second, "cluster pod CIDRs excluded from masquerade", func() error {
		out, err := exec.Command("nft", "list", "set", "inet", "qoscni", "masq-skip-cluster4").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		for _, c := range nd.Spec.PodCIDRs {
			if ip, _, err := net.ParseCIDR(c); err == nil && ip.To4() != nil && !nftSetCovers(string(out), c) {
				return fmt.Errorf("%s not in %s", c, out)
			}
		}
		return nil
	})
}

// deployment returns a one-replica Deployment of the workload image.
func deployment(name string, annotations map[string]string, ports []corev1.ContainerPort) *appsv1.Deployment {
	one := int32(1)
	labels := map[string]string{"app": name}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: appsv1.DeploymentSpec{
			Replicas: &one,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: annotations},
				Spec: corev1.PodSpec{
					// The first node unless deploymentOn says otherwise: the
					// steps read its records and namespaces directly.
					NodeSelector:                  map[string]string{corev1.LabelHostname: nodeName},
					TerminationGracePeriodSeconds: new(int64),
					AutomountServiceAccountToken:  new(bool),
					Containers: []corev1.Container{{
						Name: "workload", Image: images.Workload, ImagePullPolicy: corev1.PullNever,
						Ports: ports,
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(images.WorkloadTCPPort)}},
							PeriodSeconds: 1,
						},
					}},
				},
			},
		},
	}
}

// runningPod waits for the Deployment's pod to be Ready and returns it
// and its attachment record.
func (e *env) runningPod(t *testing.T, app string) (*corev1.Pod, *state.Record) {
	t.Helper()
	var pod *corev1.Pod
	d := waitFor(t, 90*time.Second, app+" pod Ready", func() error {
		pods, err := e.cp.Client.CoreV1().Pods("default").List(ctx(t), metav1.ListOptions{LabelSelector: "app=" + app})
		if err != nil {
			return err
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.DeletionTimestamp != nil {
				continue
			}
			for _, c := range p.Status.Conditions {
				if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
					pod = p
					return nil
				}
			}
		}
		return fmt.Errorf("%d pods, none Ready", len(pods.Items))
	})
	t.Logf("timing: %s Ready %v after create", pod.Name, d.Round(time.Millisecond))
	rec := e.record(t, pod.Name)
	if rec == nil {
		t.Fatalf("no attachment record for pod %s", pod.Name)
	}
	return pod, rec
}

// record is the plugin's attachment record of a pod, nil if none.
func (e *env) record(t *testing.T, pod string) *state.Record {
	t.Helper()
	return e.recordIn(t, "default", pod)
}

// recordIn is record for a pod of namespace ns.
func (e *env) recordIn(t *testing.T, ns, pod string) *state.Record {
	t.Helper()
	recs, _, err := e.store.List(networkName)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.Pod.Name == pod && r.Pod.Namespace == ns {
			return r
		}
	}
	return nil
}

// podNS is the pod's network namespace (containerd's, under /run/netns).
func podNS(t *testing.T, rec *state.Record) *testnet.NS {
	t.Helper()
	if filepath.Dir(filepath.Clean(rec.Netns)) != "/var/run/netns" && filepath.Dir(filepath.Clean(rec.Netns)) != "/run/netns" {
		t.Fatalf("pod netns %s is not under /run/netns", rec.Netns)
	}
	return &testnet.NS{Name: filepath.Base(rec.Netns), Path: rec.Netns}
}

func podIPv4(t *testing.T, rec *state.Record) string {
	t.Helper()
	for _, c := range rec.IPs {
		if ip, _, err := net.ParseCIDR(c); err == nil && ip.To4() != nil {
			return ip.String()
		}
	}
	t.Fatalf("pod has no IPv4 address: %v", rec.IPs)
	return ""
}

var (
	shaped    *corev1.Pod
	shapedRec *state.Record
)

// 2. An annotated Deployment with TCP and UDP hostPorts.
func (e *env) shapedDeployment(t *testing.T) {
	dep := deployment("shaped", map[string]string{
		"kubernetes.io/ingress-bandwidth": "10M",
		"kubernetes.io/egress-bandwidth":  "20M",
	}, []corev1.ContainerPort{
		{ContainerPort: images.WorkloadTCPPort, HostPort: shapedHostTCP, Protocol: corev1.ProtocolTCP},
		{ContainerPort: images.WorkloadUDPPort, HostPort: shapedHostUDP, Protocol: corev1.ProtocolUDP},
	})
	if _, err := e.cp.Client.AppsV1().Deployments("default").Create(ctx(t), dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	shaped, shapedRec = e.runningPod(t, "shaped")
	if shapedRec.Shaping == nil || shapedRec.Shaping.Ingress == nil || shapedRec.Shaping.Egress == nil {
		t.Fatalf("record has no shaping: %+v", shapedRec.Shaping)
	}
	if got := shapedRec.Shaping.Ingress.RateBits; got != 10_000_000 {
		t.Errorf("ingress rate %d, want 10M", got)
	}
	if got := shapedRec.Shaping.Egress.RateBits; got != 20_000_000 {
		t.Errorf("egress rate %d, want 20M", got)
	}
	pns := podNS(t, shapedRec)
	ip := podIPv4(t, shapedRec)
	testnet.StartIperf3(e.top, pns)
	// Into the pod (ingress): the node sends; out of the pod (egress): the
	// pod sends (-R).
	for _, c := range []struct {
		dir     string
		rate    float64
		reverse bool
	}{{"ingress", 10e6, false}, {"egress", 20e6, true}} {
		r := measure(t, e.n.NetNS, ip, 6, c.reverse)
		t.Logf("%s: steady %.2f Mbit/s (%.3fx), first second %.2f Mbit/s (%.3fx)", c.dir, r.steady/1e6, r.steady/c.rate, r.first/1e6, r.first/c.rate)
		if r.steady < 0.90*c.rate || r.steady > 1.05*c.rate {
			t.Errorf("%s: steady %.2f Mbit/s, want 0.90-1.05x of %.0f", c.dir, r.steady/1e6, c.rate/1e6)
		}
		if r.first > 1.25*c.rate {
			t.Errorf("%s: first second %.2f Mbit/s, more than 1.25x of %.0f", c.dir, r.first/1e6, c.rate/1e6)
		}
	}
	// hostPorts: from outside the node (client netns), hairpin (the pod to
	// its own hostPort on the node), localhost (the node itself).
	checkTCP(t, e.n.Client, e.n.IP, shapedHostTCP, shaped.Name)
	checkUDP(t, e.n.Client, e.n.IP, shapedHostUDP, shaped.Name)
	checkTCP(t, pns, e.n.IP, shapedHostTCP, shaped.Name)
	checkTCP(t, e.n.NetNS, "127.0.0.1", shapedHostTCP, shaped.Name)
}

// checkTCP connects from ns to addr:port and expects the workload's line
// naming the pod.
func checkTCP(t *testing.T, ns *testnet.NS, addr string, port int, pod string) {
	t.Helper()
	hp := net.JoinHostPort(addr, strconv.Itoa(port))
	out, err := ns.Try("bash", "-c", "exec 3<>/dev/tcp/"+addr+"/"+strconv.Itoa(port)+" && timeout 5 head -n1 <&3")
	if err != nil || !strings.HasPrefix(out, pod+" ") {
		t.Errorf("TCP %s from %s: %q %v (want a line from %s)", hp, ns.Name, out, err, pod)
	}
}

// checkUDP sends a datagram from ns to addr:port and expects the echo.
func checkUDP(t *testing.T, ns *testnet.NS, addr string, port int, pod string) {
	t.Helper()
	payload := testnet.Unique("ping")
	// bash's /dev/udp sends from one socket; read the reply on it.
	out, err := ns.Try("bash", "-c", fmt.Sprintf("exec 3<>/dev/udp/%s/%d && printf %s >&3 && timeout 5 head -c %d <&3", addr, port, payload, len(pod)+1+len(payload)))
	if err != nil || out != pod+" "+payload {
		t.Errorf("UDP %s:%d from %s: %q %v (want %q)", addr, port, ns.Name, out, err, pod+" "+payload)
	}
}

// rates is one iperf3 run: the receiver's goodput after the first second
// and the first second on its own, and every interval's rate.
type rates struct {
	steady, first float64
	perSecond     []float64
}

// measure runs an iperf3 client in ns against server for secs seconds.
// reverse makes the server send.
func measure(t *testing.T, ns *testnet.NS, server string, secs int, reverse bool) rates {
	t.Helper()
	args := []string{"iperf3", "-c", server, "-t", strconv.Itoa(secs), "-J"}
	if reverse {
		args = append(args, "-R")
	}
	// A client right behind the last test is sometimes refused (seen in 1
	// of 3 runs between the two directions): retried.
	out, err := testnet.Iperf3Retry(t, server, func() (string, error) { return ns.Try(args[0], args[1:]...) })
	if err != nil {
		t.Fatalf("iperf3: %v: %s", err, out)
	}
	return parseIperf3(t, []byte(out))
}

func parseIperf3(t *testing.T, out []byte) rates {
	t.Helper()
	var r struct {
		Intervals []struct {
			Sum struct {
				BitsPerSecond float64 `json:"bits_per_second"`
				Seconds       float64 `json:"seconds"`
				Bytes         float64 `json:"bytes"`
			} `json:"sum"`
		} `json:"intervals"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &r); err != nil || r.Error != "" || len(r.Intervals) < 2 {
		t.Fatalf("iperf3 output: %v %s (%d intervals)\n%s", err, r.Error, len(r.Intervals), out)
	}
	var res rates
	var bytes, secs float64
	for i, iv := range r.Intervals {
		res.perSecond = append(res.perSecond, iv.Sum.BitsPerSecond)
		// A last interval of a few milliseconds is the end of the test,
		// not a second of it.
		if i == 0 || iv.Sum.Seconds < 0.5 {
			continue
		}
		bytes += iv.Sum.Bytes
		secs += iv.Sum.Seconds
	}
	res.steady, res.first = bytes*8/secs, r.Intervals[0].Sum.BitsPerSecond
	return res
}

// 3. kubectl annotate --overwrite: reshaped in place within 2 s while a
// transfer runs; the connection survives; the agent's metric says 5M.
func (e *env) reshape(t *testing.T) {
	ip := podIPv4(t, shapedRec)
	// A 10 s transfer into the pod; the change comes 3 s in.
	cmd := exec.Command("ip", "netns", "exec", e.n.NetNS.Name, "iperf3", "-c", ip, "-t", "10", "-J")
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	time.Sleep(3 * time.Second)
	start := time.Now()
	e.kc(t, "annotate", "--overwrite", "pod", shaped.Name, "kubernetes.io/ingress-bandwidth=5M")
	d := waitFor(t, 10*time.Second, "ingress reshaped to 5M", func() error {
		rec := e.record(t, shaped.Name)
		if rec == nil || rec.Shaping == nil || rec.Shaping.Ingress == nil {
			return fmt.Errorf("no ingress shaping in the record")
		}
		if rec.Shaping.Ingress.RateBits != 5_000_000 {
			return fmt.Errorf("record says %d", rec.Shaping.Ingress.RateBits)
		}
		// The kernel: the record is written inside the same update, after tc.
		q := run(t, "", nil, "tc", "-j", "qdisc", "show", "dev", rec.Shaping.Ingress.Device)
		if !strings.Contains(q, `"rate":625000`) && !strings.Contains(q, "5Mbit") {
			return fmt.Errorf("qdisc: %s", q)
		}
		return nil
	})
	since := time.Since(start)
	t.Logf("timing: annotate -> kernel at 5M in %v (kubectl included: %v)", d.Round(time.Millisecond), since.Round(time.Millisecond))
	if since > 2*time.Second {
		t.Errorf("reshaped %v after kubectl annotate, want within 2 s", since)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the transfer did not survive the reshape: %v: %s", err, out.String())
	}
	r := parseIperf3(t, []byte(out.String()))
	if len(r.perSecond) < 8 {
		t.Fatalf("a 10 s transfer reported %d intervals: %.2f Mbit/s", len(r.perSecond), mbits(r.perSecond))
	}
	var tail float64
	n := 0
	for _, v := range r.perSecond[6:min(10, len(r.perSecond))] {
		tail += v
		n++
	}
	tail /= float64(n)
	t.Logf("transfer across the change, per second (Mbit/s): %.2f", mbits(r.perSecond))
	if tail < 0.85*5e6 || tail > 1.1*5e6 {
		t.Errorf("after the reshape the transfer runs at %.2f Mbit/s, want about 5", tail/1e6)
	}
	// The pod says what it got (qoscni.io/effective-shaping), and an
	// Event said so.
	waitFor(t, 10*time.Second, "effective-shaping annotation at 5M", func() error {
		p, err := e.cp.Client.CoreV1().Pods("default").Get(ctx(t), shaped.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		v := p.Annotations[reconcile.AnnotationEffective]
		if !strings.Contains(v, `"ingress":{"limit":"5Mbit/s","source":"annotation"`) || !strings.Contains(v, `"inKernel":true`) {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	evs, err := e.cp.Client.CoreV1().Events("default").List(ctx(t), metav1.ListOptions{FieldSelector: "involvedObject.name=" + shaped.Name + ",reason=" + reconcile.ReasonShapingApplied})
	if err != nil || len(evs.Items) < 2 {
		t.Errorf("ShapingApplied events on %s: %v (want the first and the change)", shaped.Name, err)
	} else {
		t.Logf("event: %s", evs.Items[len(evs.Items)-1].Message)
	}
	// The agent's metric (from outside the node, as a scraper sees it).
	waitFor(t, 10*time.Second, "metric at 5M", func() error {
		v, err := scrape(e.n.Client, e.n.IP, "qoscni_shaping_rate_limit_bytes_per_second", shaped.Name, "ingress")
		if err != nil {
			return err
		}
		if v != 5e6/8 {
			return fmt.Errorf("limit %v B/s", v)
		}
		return nil
	})
}

func mbits(v []float64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = x / 1e6
	}
	return out
}

// scrape reads one series of the agent's /metrics from ns.
// scrape reads one sample of the node agent's metric for the pod ("" =
// a node metric) and direction.
func scrape(ns *testnet.NS, nodeIP, metric, pod, direction string) (float64, error) {
	out, err := ns.Try("curl", "-sf", "--max-time", "5", fmt.Sprintf("http://%s:%d%s", nodeIP, install.ListenPort, install.MetricsPath))
	if err != nil {
		return 0, fmt.Errorf("curl: %v %s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, metric+"{") || (pod != "" && !strings.Contains(line, `pod="`+pod+`"`)) || !strings.Contains(line, `direction="`+direction+`"`) {
			continue
		}
		f := strings.Fields(line)
		return strconv.ParseFloat(f[len(f)-1], 64)
	}
	return 0, fmt.Errorf("no %s for %s/%s", metric, pod, direction)
}

// 4. A real Prometheus scrapes the agent's pod endpoint (hostNetwork: the
// node's :9742) from outside the node; PromQL returns the pod's throughput
// and limit with namespace and pod labels.
func (e *env) prometheus(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("prometheus not installed (make deps)")
	}
	dir := t.TempDir()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: qoscni-agent\n    static_configs:\n      - targets: ['%s:%d']\n", e.n.IP, install.ListenPort)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	listen := net.JoinHostPort(node.ClientIP, "9090")
	cmd := exec.Command("ip", "netns", "exec", e.n.Client.Name, prom, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+listen)
	logf, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logf.Close() })
	// Traffic to measure, while Prometheus scrapes.
	go func() { _, _ = e.n.NetNS.Try("iperf3", "-c", podIPv4(t, shapedRec), "-t", "8") }()
	queries := map[string]string{
		"throughput": fmt.Sprintf(`sum by (namespace, pod, direction) (rate(qoscni_shaping_sent_bytes_total{pod=%q}[4s])) * 8`, shaped.Name),
		"limit":      fmt.Sprintf(`qoscni_shaping_rate_limit_bytes_per_second{pod=%q} * 8`, shaped.Name),
	}
	for what, q := range queries {
		waitFor(t, 30*time.Second, "PromQL "+what, func() error {
			res, err := promQuery(listen, q)
			if err != nil {
				return err
			}
			if len(res) != 2 {
				return fmt.Errorf("%d series", len(res))
			}
			for _, r := range res {
				if r.Metric["namespace"] != "default" || r.Metric["pod"] != shaped.Name {
					return fmt.Errorf("labels %v", r.Metric)
				}
				v, _ := strconv.ParseFloat(fmt.Sprint(r.Value[1]), 64)
				if what == "throughput" && r.Metric["direction"] == "ingress" && v < 1e6 {
					return fmt.Errorf("ingress throughput %v bit/s while a transfer runs", v)
				}
				if what == "limit" && r.Metric["direction"] == "ingress" && v != 5e6 {
					return fmt.Errorf("ingress limit %v", v)
				}
			}
			t.Logf("PromQL %s: %v", what, res)
			return nil
		})
	}
}

type promSeries struct {
	Metric map[string]string `json:"metric"`
	Value  []any             `json:"value"`
}

func promQuery(addr, q string) ([]promSeries, error) {
	var res struct {
		Status string `json:"status"`
		Data   struct {
			Result []promSeries `json:"result"`
		} `json:"data"`
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		return nil, err
	}
	if res.Status != "success" {
		return nil, fmt.Errorf("status %s", res.Status)
	}
	return res.Data.Result, nil
}

// 5. A pod without annotations is not shaped.
func (e *env) unshaped(t *testing.T) {
	if _, err := e.cp.Client.AppsV1().Deployments("default").Create(ctx(t), deployment("plain", nil, nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, rec := e.runningPod(t, "plain")
	if rec.Shaping != nil && (rec.Shaping.Ingress != nil || rec.Shaping.Egress != nil) {
		t.Errorf("unannotated pod shaped: %+v", rec.Shaping)
	}
	testnet.StartIperf3(t, podNS(t, rec))
	r := measure(t, e.n.NetNS, podIPv4(t, rec), 3, false)
	t.Logf("unannotated pod: %.0f Mbit/s", r.steady/1e6)
	if r.steady < 100e6 {
		t.Errorf("unannotated pod at %.1f Mbit/s, want >= 10x 10M", r.steady/1e6)
	}
}

// 6. Delete the pods (the tests' and CoreDNS), then qoscni: nothing of
// theirs is left on either node.
func (e *env) deleteAndUninstall(t *testing.T) {
	for _, ns := range []string{"default", "kube-system"} {
		deps, err := e.cp.Client.AppsV1().Deployments(ns).List(ctx(t), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range deps.Items {
			if err := e.cp.Client.AppsV1().Deployments(ns).Delete(ctx(t), d.Name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	waitFor(t, 60*time.Second, "pods gone", func() error {
		for _, ns := range []string{"default", "kube-system"} {
			pods, err := e.cp.Client.CoreV1().Pods(ns).List(ctx(t), metav1.ListOptions{})
			if err != nil {
				return err
			}
			if len(pods.Items) > 0 {
				return fmt.Errorf("%d pods in %s", len(pods.Items), ns)
			}
		}
		return nil
	})
	// The kubelet's later DELs (sandbox garbage collection, empty netns,
	// no prevResult) must succeed too, or the sandboxes stay.
	d := waitFor(t, 150*time.Second, "pod sandboxes removed", func() error {
		for _, c := range []*containerd.Containerd{e.ctd, e.ctd2} {
			for _, ns := range []string{"default", "kube-system"} {
				if out := strings.TrimSpace(c.Crictl(t, "pods", "--namespace", ns, "-q")); out != "" {
					return fmt.Errorf("sandboxes of %s left on %s: %s", ns, containerd.Name(c.Version), out)
				}
			}
		}
		return nil
	})
	t.Logf("timing: sandboxes removed %v after the pods", d.Round(time.Millisecond))
	checkNoPodLeft(t, nodeName, e.tryHere)
	checkNoPodLeft(t, node2Name, e.tryOn)

	if e.helm != "" {
		t.Logf("helm uninstall:\n%s", e.helmCmd(t, "uninstall", helmRelease, "--namespace", "qoscni", "--wait", "--timeout=60s"))
		e.kc(t, "delete", "namespace", "qoscni", "--wait=true", "--timeout=60s")
	} else {
		e.kc(t, "delete", "-k", "deploy/", "--wait=true", "--timeout=60s")
	}
	e.kc(t, "apply", "-k", "deploy/uninstall")
	waitFor(t, 60*time.Second, "uninstall DaemonSet ready", func() error {
		ds, err := e.cp.Client.AppsV1().DaemonSets("qoscni-uninstall").Get(ctx(t), "qoscni-uninstall", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.NumberReady != 2 {
			return fmt.Errorf("ready %d", ds.Status.NumberReady)
		}
		return nil
	})
	e.kc(t, "delete", "-k", "deploy/uninstall", "--wait=true", "--timeout=60s")
	if _, err := os.Stat(filepath.Join(install.CNIConfDir, install.ConflistName)); !os.IsNotExist(err) {
		t.Errorf("conflist still installed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(install.CNIBinDir, install.PluginBinary)); !os.IsNotExist(err) {
		t.Errorf("plugin binary still installed: %v", err)
	}
	if out, err := exec.Command("nft", "list", "table", "inet", "qoscni").CombinedOutput(); err == nil {
		t.Errorf("nftables table inet qoscni left:\n%s", out)
	}
}

// checkNoPodLeft: no pod veth or IFB, no hostPort element, no address
// reservation, no record on the node whose commands try runs.
func checkNoPodLeft(t *testing.T, node string, try func(args ...string) (string, error)) {
	t.Helper()
	links, err := try("ip", "-br", "link")
	if err != nil {
		t.Fatalf("%s: ip link: %v %s", node, err, links)
	}
	for _, l := range strings.Split(links, "\n") {
		if f := strings.Fields(l); len(f) > 0 && (strings.HasPrefix(f[0], "qv") || strings.HasPrefix(f[0], "qi")) {
			t.Errorf("%s: link left: %s", node, l)
		}
	}
	if out, err := try("nft", "-j", "list", "table", "inet", "qoscni"); err == nil {
		for _, port := range []int{shapedHostTCP, shapedHostUDP} {
			if strings.Contains(out, strconv.Itoa(port)) {
				t.Errorf("%s: hostPort %d still in nftables: %s", node, port, out)
			}
		}
	}
	// No DRA grant either: the pods' claims were unprepared.
	if out, err := try("sh", "-c", "ls -1 "+paths.GrantDir+" 2>/dev/null || true"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("%s: DRA grants left in %s: %v %s", node, paths.GrantDir, err, out)
	}
	for _, dir := range []string{filepath.Join(install.StateDir, networkName), filepath.Join(install.IPAMDir, networkName)} {
		out, err := try("sh", "-c", "ls -1 "+dir+" 2>/dev/null || true")
		if err != nil {
			t.Fatalf("%s: ls %s: %v %s", node, dir, err, out)
		}
		for _, name := range strings.Fields(out) {
			if strings.HasSuffix(name, ".json") || net.ParseIP(name) != nil {
				t.Errorf("%s: left in %s: %s", node, dir, name)
			}
		}
	}
}

// tryHere runs a command on the first node (the test's own namespaces).
func (e *env) tryHere(args ...string) (string, error) {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	return string(out), err
}

func TestNftSetCovers(t *testing.T) {
	listing := "table inet qoscni {\n\tset s {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/23, 10.9.0.1,\n\t\t\t     192.168.1.10-192.168.1.20 }\n\t}\n}"
	for cidr, want := range map[string]bool{
		"10.244.0.0/24": true, "10.244.1.0/24": true, "10.244.0.0/23": true, "10.244.2.0/24": false,
		"10.244.0.0/22": false, "10.9.0.1/32": true, "192.168.1.12/31": true, "192.168.1.16/28": false,
	} {
		if got := nftSetCovers(listing, cidr); got != want {
			t.Errorf("nftSetCovers(%s) = %v, want %v", cidr, got, want)
		}
	}
}
