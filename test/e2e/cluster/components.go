package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/qoscni/qoscni/test/e2e/node"
)

// StartControllerManager starts kube-controller-manager against the
// control plane: deployments, replica sets, daemon sets, garbage
// collection, service accounts and their root CA ConfigMap, and, when
// clusterCIDRs are given, node CIDR allocation (spec.podCIDRs, /24 for
// IPv4 and /64 for IPv6). Stopped when the test ends.
func (cp *ControlPlane) StartControllerManager(t testing.TB, clusterCIDRs ...string) {
	t.Helper()
	bin := Binary(t, "kube-controller-manager")
	kc := filepath.Join(cp.Dir, "controller-manager.kubeconfig")
	if err := cp.WriteKubeconfig(kc, "system:kube-controller-manager"); err != nil {
		t.Fatal(err)
	}
	p := startRetrying(t, cp.sp, "kube-controller-manager", func() (*node.Process, error) {
		port := freePort(t)
		args := []string{
			"--kubeconfig=" + kc,
			"--authentication-kubeconfig=" + kc, "--authorization-kubeconfig=" + kc,
			"--bind-address=127.0.0.1", "--secure-port=" + port,
			"--cert-dir=" + filepath.Join(cp.Dir, "controller-manager"),
			"--leader-elect=false",
			"--root-ca-file=" + cp.CAFile,
			"--service-account-private-key-file=" + cp.ServiceAccountKeyFile,
			"--use-service-account-credentials=true",
			"--service-cluster-ip-range=" + ServiceCIDR,
			// One node: no need to wait 40 s to call it unreachable, nor
			// for anything to evict.
			"--node-monitor-grace-period=20s",
			"--concurrent-deployment-syncs=5",
			"--profiling=false",
		}
		if len(clusterCIDRs) > 0 {
			args = append(args, "--allocate-node-cidrs=true", "--cluster-cidr="+strings.Join(clusterCIDRs, ","),
				"--node-cidr-mask-size-ipv4=24", "--node-cidr-mask-size-ipv6=64")
		}
		p, err := cp.sp.Start("kube-controller-manager", filepath.Join(cp.Dir, "kube-controller-manager.log"), bin, args...)
		if err != nil {
			return nil, err
		}
		return p, waitHTTP(p, startTimeout, func() error { return healthz("https://127.0.0.1:" + port + "/healthz") })
	})
	t.Cleanup(func() { p.Stop(t, stopTimeout) })
}

// StartScheduler starts kube-scheduler; stopped when the test ends.
func (cp *ControlPlane) StartScheduler(t testing.TB) {
	t.Helper()
	bin := Binary(t, "kube-scheduler")
	kc := filepath.Join(cp.Dir, "scheduler.kubeconfig")
	if err := cp.WriteKubeconfig(kc, "system:kube-scheduler"); err != nil {
		t.Fatal(err)
	}
	p := startRetrying(t, cp.sp, "kube-scheduler", func() (*node.Process, error) {
		port := freePort(t)
		args := []string{
			"--kubeconfig=" + kc,
			"--authentication-kubeconfig=" + kc, "--authorization-kubeconfig=" + kc,
			"--bind-address=127.0.0.1", "--secure-port=" + port,
			"--leader-elect=false", "--profiling=false",
		}
		p, err := cp.sp.Start("kube-scheduler", filepath.Join(cp.Dir, "kube-scheduler.log"), bin, args...)
		if err != nil {
			return nil, err
		}
		return p, waitHTTP(p, startTimeout, func() error { return healthz("https://127.0.0.1:" + port + "/healthz") })
	})
	t.Cleanup(func() { p.Stop(t, stopTimeout) })
}

// KubeletOptions describe the node a kubelet registers.
type KubeletOptions struct {
	// NodeName and NodeIP: the Node object's name and InternalIP.
	NodeName, NodeIP string
	// RuntimeEndpoint is the CRI socket, unix:///path.
	RuntimeEndpoint string
	// Exec is the node's command prefix (node.Node.Exec): nil runs the
	// kubelet on the test's own node.
	Exec []string
	// ClusterDNS is the cluster DNS Service's address pods resolve with
	// ("" = none).
	ClusterDNS string
}

// Kubelet is a running kubelet.
type Kubelet struct {
	Dir        string // its config, certificates and log (its --root-dir is kubeletRoot)
	CgroupRoot string // the cgroup every pod lives under
}

// StartKubelet starts a kubelet that registers o.NodeName and returns once
// the Node exists (it is Ready only once a CNI config is installed). The
// kubelet writes global state whatever its flags say (/var/lib/kubelet,
// /var/log/pods, kernel.panic and other sysctls): run it inside test/e2e/node,
// which covers those. Its pods' cgroups live under a cgroup root of their
// own, removed when the test ends, after the kubelet stopped.
func (cp *ControlPlane) StartKubelet(t testing.TB, o KubeletOptions) *Kubelet {
	t.Helper()
	bin := Binary(t, "kubelet")
	dir := filepath.Join(cp.Dir, "kubelet-"+o.NodeName)
	k := &Kubelet{Dir: dir, CgroupRoot: "/qoscni-e2e-" + o.NodeName}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(dir, "kubeconfig")
	write := cp.WriteKubeconfig
	if o.Exec != nil {
		write = cp.WriteNodeKubeconfig
	}
	if err := write(kc, "system:node:"+o.NodeName, "system:nodes"); err != nil {
		t.Fatal(err)
	}
	cert, key, err := cp.ca.issue(certSpec{commonName: "system:node:" + o.NodeName, orgs: []string{"system:nodes"},
		server: true, ips: []net.IP{net.ParseIP(o.NodeIP), net.ParseIP("127.0.0.1")}, dnsNames: []string{o.NodeName}})
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFiles(map[string][]byte{filepath.Join(dir, "kubelet.crt"): cert, filepath.Join(dir, "kubelet.key"): key}); err != nil {
		t.Fatal(err)
	}
	removeCgroups := makeCgroupRoot(t, k.CgroupRoot)
	// Both run after the kubelet's stop, registered below: its volumes
	// (tmpfs, projected tokens) stay mounted under its root dir.
	t.Cleanup(removeCgroups)
	if o.Exec == nil {
		// Another node's volume mounts live and die in its own mount
		// namespace.
		t.Cleanup(func() {
			for _, d := range []string{dir, kubeletRoot} {
				if err := node.UnmountUnder(d); err != nil {
					t.Errorf("kubelet mounts: %v", err)
				}
			}
		})
	}
	clusterDNS := ""
	if o.ClusterDNS != "" {
		clusterDNS = "clusterDNS: [" + o.ClusterDNS + "]"
	}
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %[1]s
readOnlyPort: 0
healthzBindAddress: %[1]s
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[2]s}
authorization: {mode: Webhook}
tlsCertFile: %[3]s/kubelet.crt
tlsPrivateKeyFile: %[3]s/kubelet.key
containerRuntimeEndpoint: %[4]s
cgroupDriver: cgroupfs
cgroupRoot: %[5]s
# These machines: cgroup v1 and swap.
failCgroupV1: false
failSwapOn: false
memorySwap: {}
# A shared test machine: never evict or garbage-collect images because
# its disk or memory is busy.
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", nodefs.inodesFree: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDomain: cluster.local
resolvConf: ""
serializeImagePulls: false
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
fileCheckFrequency: 20s
%[6]s
`, o.NodeIP, cp.CAFile, dir, o.RuntimeEndpoint, k.CgroupRoot, clusterDNS)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{
		"--config=" + cfgPath, "--kubeconfig=" + kc,
		"--root-dir=" + kubeletRoot,
		"--hostname-override=" + o.NodeName, "--node-ip=" + o.NodeIP,
		"--v=2",
	}
	began := time.Now()
	cmd := onNode(o.Exec, bin, args)
	p, err := cp.sp.Start("kubelet", filepath.Join(dir, "kubelet.log"), cmd[0], cmd[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(t, stopTimeout) })
	err = waitHTTP(p, startTimeout, func() error {
		if err := healthz("http://" + net.JoinHostPort(o.NodeIP, "10248") + "/healthz"); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := cp.Client.CoreV1().Nodes().Get(ctx, o.NodeName, metav1.GetOptions{})
		return err
	})
	if err != nil {
		t.Fatalf("kubelet: %v\nlast lines of %s:\n%s", err, p.Log, node.Tail(p.Log))
	}
	t.Logf("kubelet registered node %s in %v (pid %d, log %s)", o.NodeName, time.Since(began).Round(time.Millisecond), p.Cmd.Process.Pid, p.Log)
	return k
}

// kubeletRoot is every kubelet's --root-dir: the default, so that the
// DaemonSet's hostPaths under it (the DRA driver's plugin registration and
// socket directories) are where the kubelet looks. Each node covers it
// with a tmpfs of its own (test/e2e/node), so two kubelets do not share it.
const kubeletRoot = "/var/lib/kubelet"

// makeCgroupRoot creates root in every cgroup v1 hierarchy (the kubelet
// refuses a cgroup root that does not exist) and returns the function that
// removes it, deepest directories first.
func makeCgroupRoot(t testing.TB, root string) func() {
	t.Helper()
	var made []string
	entries, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		h := filepath.Join("/sys/fs/cgroup", e.Name())
		if fi, err := os.Lstat(h); err != nil || !fi.IsDir() {
			continue // the cpu,cpuacct style symlinks
		}
		d := filepath.Join(h, root)
		if err := os.Mkdir(d, 0o755); err != nil && !os.IsExist(err) {
			continue // read-only or not a hierarchy
		}
		made = append(made, d)
	}
	return func() {
		for _, d := range made {
			removeCgroupTree(t, d)
		}
	}
}

// removeCgroupTree removes a cgroup directory and its children (cgroupfs
// directories are removed with rmdir, children first), retrying while
// the last processes exit.
func removeCgroupTree(t testing.TB, dir string) {
	deadline := time.Now().Add(10 * time.Second)
	// Pods still running (a test that failed before deleting them) are in
	// there; containerd's own cleanup comes later and cannot come first
	// (the kubelet would restart them).
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		return nil
	})
	for {
		var dirs []string
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		var last error
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !os.IsNotExist(err) {
				last = err
			}
		}
		if last == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("cgroup %s left behind: %v", dir, last)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// healthz is nil when url answers 200 (TLS unverified: the components
// serve self-signed certificates).
func healthz(url string) error {
	c := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

// onNode is the command line that runs bin with args through a node's
// command prefix (none: the test's own node).
func onNode(prefix []string, bin string, args []string) []string {
	return append(append(append([]string{}, prefix...), bin), args...)
}

// KubeProxyOptions describe the node a kube-proxy serves.
type KubeProxyOptions struct {
	NodeName, NodeIP string
	// Mode is "nftables" or "iptables".
	Mode string
	// ClusterCIDRs are the pods' ranges (traffic from outside them to a
	// Service is masqueraded).
	ClusterCIDRs []string
	// Exec is the node's command prefix (node.Node.Exec).
	Exec []string
}

// StartKubeProxy starts kube-proxy for one node and returns once it
// answers its health check (it has synced its rules once). Its conntrack
// settings are left alone: those sysctls are global on these kernels.
func (cp *ControlPlane) StartKubeProxy(t testing.TB, o KubeProxyOptions) {
	t.Helper()
	bin := Binary(t, "kube-proxy")
	dir := filepath.Join(cp.Dir, "kube-proxy-"+o.NodeName)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(dir, "kubeconfig")
	write := cp.WriteKubeconfig
	if o.Exec != nil {
		write = cp.WriteNodeKubeconfig
	}
	if err := write(kc, "system:kube-proxy"); err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %[1]s}
hostnameOverride: %[2]s
bindAddress: %[3]s
healthzBindAddress: %[3]s:10256
metricsBindAddress: %[3]s:10249
mode: %[4]s
clusterCIDR: %[5]s
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
`, kc, o.NodeName, o.NodeIP, o.Mode, strings.Join(o.ClusterCIDRs, ","))
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := onNode(o.Exec, bin, []string{"--config=" + cfgPath, "--v=2"})
	began := time.Now()
	p, err := cp.sp.Start("kube-proxy", filepath.Join(dir, "kube-proxy.log"), cmd[0], cmd[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(t, stopTimeout) })
	err = waitHTTP(p, startTimeout, func() error {
		return healthz("http://" + net.JoinHostPort(o.NodeIP, "10256") + "/healthz")
	})
	if err != nil {
		t.Fatalf("kube-proxy (%s): %v\nlast lines of %s:\n%s", o.Mode, err, p.Log, node.Tail(p.Log))
	}
	t.Logf("kube-proxy (%s) on %s ready in %v (pid %d, log %s)", o.Mode, o.NodeName, time.Since(began).Round(time.Millisecond), p.Cmd.Process.Pid, p.Log)
}
