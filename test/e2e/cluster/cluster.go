// Package cluster starts a real Kubernetes control plane for tests: etcd
// and kube-apiserver as processes on 127.0.0.1, with certificates made in
// Go, from the binaries test/e2e/build.sh caches. Nothing runs pods (no kubelet,
// scheduler or controller-manager yet): a test creates the objects it needs,
// with spec.nodeName set for pods.
//
// The binaries take about 14 minutes to build the first time, so tests
// never build them: without them a test skips, and fails only when CI said
// it built them (QOSCNI_E2E_BUILT with QOSCNI_REQUIRE_ROOT, set by .ci/run).
package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/qoscni/qoscni/test/e2e/node"
)

const (
	// BuiltEnv says the e2e binaries were built in this run (.ci/run sets
	// it after test/e2e/build.sh); with QOSCNI_REQUIRE_ROOT a missing binary is
	// then a failure, not a skip.
	BuiltEnv = "QOSCNI_E2E_BUILT"
	// LogsEnv, when set, shows the processes' last log lines also when
	// the test passed (they always show when it failed).
	LogsEnv = node.ShowLogsEnv
	// RequireRootEnv is testnet's switch from skips to failures.
	RequireRootEnv = "QOSCNI_REQUIRE_ROOT"

	// ServiceCIDR is the cluster's service range; ServiceIP is the
	// kubernetes service's address in it, named in the serving cert.
	ServiceCIDR = "10.0.0.0/24"
	ServiceIP   = "10.0.0.1"
	// Issuer is the service-account token issuer.
	Issuer = "https://kubernetes.default.svc.cluster.local"

	startTimeout = 90 * time.Second
	stopTimeout  = 20 * time.Second
)

// Options change the control plane. The zero value is what most tests want.
type Options struct {
	// APIServerArgs are appended to the API server's flags; a flag given
	// again overrides the default (the last value wins), e.g.
	// "--enable-admission-plugins=ServiceAccount" once a controller-manager
	// creates service accounts.
	APIServerArgs []string
	// EtcdArgs are appended to etcd's flags.
	EtcdArgs []string
	// AdvertiseAddress is the API server's address for the kubernetes
	// service; default 127.0.0.1. A loopback address cannot be an
	// endpoint, so then the endpoint reconciler is off.
	AdvertiseAddress string
	// BindAddress is where the API server listens; default 127.0.0.1.
	// A node's pods (the agent's in-cluster config) need the advertised
	// address, e.g. "0.0.0.0".
	BindAddress string
	// ServiceAccounts keeps the ServiceAccount admission plugin on: pods
	// then get tokens, which needs a controller-manager (the root CA
	// ConfigMap, the service-account controllers).
	ServiceAccounts bool
}

// ControlPlane is a running etcd and kube-apiserver.
type ControlPlane struct {
	// Client is an admin (system:masters) clientset.
	Client *kubernetes.Clientset
	// Config is the admin client's configuration.
	Config *rest.Config
	// Kubeconfig is the admin kubeconfig file.
	Kubeconfig string
	// URL is the API server, https://127.0.0.1:<port>.
	URL string
	// NodeURL is the API server as other nodes reach it: on the
	// advertised address (when it listens on more than loopback).
	NodeURL string
	// EtcdURL is etcd's client URL (plain HTTP on loopback).
	EtcdURL string
	// Dir holds the certificates, keys, data and logs.
	Dir string
	// CAFile is the cluster CA certificate; ServiceAccountKeyFile and
	// ServiceAccountPubFile the token signing key pair (for a
	// controller-manager).
	CAFile, ServiceAccountKeyFile, ServiceAccountPubFile string

	ca *authority
	sp *node.Spawner
}

// StartControlPlane starts etcd and kube-apiserver with default Options.
func StartControlPlane(t testing.TB) *ControlPlane {
	t.Helper()
	return StartControlPlaneWith(t, Options{})
}

// StartControlPlaneWith starts etcd and kube-apiserver, waits until the
// API server is ready, and stops both when the test ends, also when it
// fails. It skips the test when the binaries are not built.
func StartControlPlaneWith(t testing.TB, o Options) *ControlPlane {
	t.Helper()
	etcdBin := Binary(t, "etcd")
	apiBin := Binary(t, "kube-apiserver")
	if o.AdvertiseAddress == "" {
		o.AdvertiseAddress = "127.0.0.1"
	}
	if o.BindAddress == "" {
		o.BindAddress = "127.0.0.1"
	}
	dir := t.TempDir()
	cp := &ControlPlane{
		Dir:                   dir,
		CAFile:                filepath.Join(dir, "ca.crt"),
		ServiceAccountKeyFile: filepath.Join(dir, "sa.key"),
		ServiceAccountPubFile: filepath.Join(dir, "sa.pub"),
		Kubeconfig:            filepath.Join(dir, "admin.kubeconfig"),
	}
	sp := node.NewSpawner(t)
	cp.sp = sp
	if err := cp.writePKI(o.AdvertiseAddress); err != nil {
		t.Fatalf("control plane certificates: %v", err)
	}

	etcd := startRetrying(t, sp, "etcd", func() (*node.Process, error) {
		client, peer := freePort(t), freePort(t)
		cp.EtcdURL = "http://127.0.0.1:" + client
		peerURL := "http://127.0.0.1:" + peer
		// A failed attempt bootstrapped its member with other URLs.
		data := filepath.Join(dir, "etcd")
		if err := os.RemoveAll(data); err != nil {
			return nil, err
		}
		args := []string{
			"--name=e2e", "--data-dir=" + data,
			"--listen-client-urls=" + cp.EtcdURL, "--advertise-client-urls=" + cp.EtcdURL,
			"--listen-peer-urls=" + peerURL, "--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=e2e=" + peerURL, "--initial-cluster-state=new",
			// A test cluster's data does not outlive the test.
			"--unsafe-no-fsync", "--log-level=warn",
		}
		p, err := sp.Start("etcd", filepath.Join(dir, "etcd.log"), etcdBin, append(args, o.EtcdArgs...)...)
		if err != nil {
			return nil, err
		}
		return p, waitHTTP(p, startTimeout, func() error { return etcdHealthy(cp.EtcdURL) })
	})
	t.Cleanup(func() { etcd.Stop(t, stopTimeout) })

	api := startRetrying(t, sp, "kube-apiserver", func() (*node.Process, error) {
		port := freePort(t)
		cp.URL = "https://127.0.0.1:" + port
		cp.NodeURL = "https://" + net.JoinHostPort(o.AdvertiseAddress, port)
		if err := cp.writeAdminKubeconfig(); err != nil {
			return nil, err
		}
		args := []string{
			"--etcd-servers=" + cp.EtcdURL,
			"--bind-address=" + o.BindAddress, "--secure-port=" + port,
			"--advertise-address=" + o.AdvertiseAddress,
			"--cert-dir=" + filepath.Join(dir, "apiserver"),
			"--tls-cert-file=" + filepath.Join(dir, "apiserver.crt"),
			"--tls-private-key-file=" + filepath.Join(dir, "apiserver.key"),
			"--client-ca-file=" + cp.CAFile,
			"--service-account-issuer=" + Issuer,
			"--service-account-key-file=" + cp.ServiceAccountPubFile,
			"--service-account-signing-key-file=" + cp.ServiceAccountKeyFile,
			"--service-cluster-ip-range=" + ServiceCIDR,
			// Node for kubelets (issue 8), RBAC for everything else; the
			// admin is system:masters.
			"--authorization-mode=Node,RBAC",
			"--allow-privileged=true",
			"--kubelet-preferred-address-types=InternalIP",
			"--kubelet-client-certificate=" + filepath.Join(dir, "apiserver-kubelet-client.crt"),
			"--kubelet-client-key=" + filepath.Join(dir, "apiserver-kubelet-client.key"),
			"--profiling=false",
		}
		if !o.ServiceAccounts {
			// Needs the default service account, which only a
			// controller-manager creates.
			args = append(args, "--disable-admission-plugins=ServiceAccount")
		}
		if ip := net.ParseIP(o.AdvertiseAddress); ip != nil && ip.IsLoopback() {
			args = append(args, "--endpoint-reconciler-type=none")
		}
		p, err := sp.Start("kube-apiserver", filepath.Join(dir, "kube-apiserver.log"), apiBin, append(args, o.APIServerArgs...)...)
		if err != nil {
			return nil, err
		}
		return p, waitHTTP(p, startTimeout, cp.ready)
	})
	t.Cleanup(func() { api.Stop(t, stopTimeout) })
	return cp
}

// Binary returns the cached binary of a component built by test/e2e/build.sh,
// or skips the test (fails it when CI built the binaries).
func Binary(t testing.TB, component string) string {
	t.Helper()
	script := filepath.Join(sourceDir(), "..", "build.sh")
	out, err := exec.Command("bash", script, "--path", component).Output()
	path := strings.TrimSpace(string(out))
	if err == nil && path != "" {
		return path
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		path = strings.TrimSpace(string(ee.Stderr))
	}
	msg := fmt.Sprintf("e2e: %s is not built (%s): run `make e2e-build` (test/e2e/build.sh, about 14 min the first time)", component, path)
	if os.Getenv(RequireRootEnv) != "" && os.Getenv(BuiltEnv) != "" {
		t.Fatalf("%s, though %s says CI built it", msg, BuiltEnv)
	}
	t.Skip(msg)
	return ""
}

func sourceDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file)
}

// WriteKubeconfig writes a kubeconfig for user in groups, with a client
// certificate from the cluster CA; for a kubelet: "system:node:<name>",
// "system:nodes".
func (cp *ControlPlane) WriteKubeconfig(path, user string, groups ...string) error {
	return cp.writeKubeconfig(path, cp.URL, user, groups...)
}

// WriteNodeKubeconfig is WriteKubeconfig for a program on another node:
// it reaches the API server on the advertised address.
func (cp *ControlPlane) WriteNodeKubeconfig(path, user string, groups ...string) error {
	return cp.writeKubeconfig(path, cp.NodeURL, user, groups...)
}

func (cp *ControlPlane) writeKubeconfig(path, server, user string, groups ...string) error {
	cert, key, err := cp.ca.issue(certSpec{commonName: user, orgs: groups, client: true})
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: cp.ca.certPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: cert, ClientKeyData: key}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: user}
	cfg.CurrentContext = "e2e"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}

func (cp *ControlPlane) writePKI(advertise string) error {
	ca, err := newAuthority()
	if err != nil {
		return err
	}
	cp.ca = ca
	ips := []net.IP{net.ParseIP("127.0.0.1"), net.IPv6loopback, net.ParseIP(ServiceIP)}
	if ip := net.ParseIP(advertise); ip != nil && !ip.IsLoopback() {
		ips = append(ips, ip)
	}
	serving, servingKey, err := ca.issue(certSpec{
		commonName: "kube-apiserver", server: true, ips: ips,
		dnsNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	})
	if err != nil {
		return err
	}
	kubeletClient, kubeletClientKey, err := ca.issue(certSpec{commonName: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true})
	if err != nil {
		return err
	}
	saKey, saPub, err := serviceAccountKeys()
	if err != nil {
		return err
	}
	return writeFiles(map[string][]byte{
		cp.CAFile:                                             ca.certPEM,
		filepath.Join(cp.Dir, "apiserver.crt"):                serving,
		filepath.Join(cp.Dir, "apiserver.key"):                servingKey,
		filepath.Join(cp.Dir, "apiserver-kubelet-client.crt"): kubeletClient,
		filepath.Join(cp.Dir, "apiserver-kubelet-client.key"): kubeletClientKey,
		cp.ServiceAccountKeyFile:                              saKey,
		cp.ServiceAccountPubFile:                              saPub,
	})
}

func (cp *ControlPlane) writeAdminKubeconfig() error {
	if err := cp.WriteKubeconfig(cp.Kubeconfig, "qoscni-e2e-admin", "system:masters"); err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		return fmt.Errorf("load %s: %w", cp.Kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	cfg.UserAgent = "qoscni-e2e"
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	cp.Config, cp.Client = cfg, c
	return nil
}

// ready is nil once /readyz says ok (etcd reachable, post-start hooks such
// as the RBAC bootstrap roles done) and the system namespaces exist.
func (cp *ControlPlane) ready() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var code int
	body, err := cp.Client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).StatusCode(&code).Raw()
	if err != nil {
		return fmt.Errorf("/readyz: %d %v %s", code, err, lastLine(body))
	}
	// The system namespaces are created after start, not awaited by
	// /readyz; NamespaceLifecycle refuses objects in a missing one.
	for _, ns := range []string{"default", "kube-system"} {
		if _, err := cp.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); err != nil {
			return fmt.Errorf("namespace %s: %w", ns, err)
		}
	}
	return nil
}

func etcdHealthy(url string) error {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url + "/health")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !bytes.Contains(b, []byte(`"health":"true"`)) {
		return fmt.Errorf("etcd /health: %d %s", resp.StatusCode, b)
	}
	return nil
}

// startRetrying starts a process up to three times while it loses its
// random ports to someone else (they are free when picked, not reserved).
func startRetrying(t testing.TB, sp *node.Spawner, name string, start func() (*node.Process, error)) *node.Process {
	t.Helper()
	var p *node.Process
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		began := time.Now()
		p, err = start()
		if err == nil {
			t.Logf("%s ready in %v (pid %d, log %s)", name, time.Since(began).Round(time.Millisecond), p.Cmd.Process.Pid, p.Log)
			return p
		}
		if p != nil {
			p.Stop(t, stopTimeout)
			if bytes.Contains([]byte(node.Tail(p.Log)), []byte("address already in use")) {
				t.Logf("%s: port taken, retrying", name)
				continue
			}
		}
		break
	}
	if p != nil {
		t.Fatalf("start %s: %v\nlast lines of %s:\n%s", name, err, p.Log, []byte(node.Tail(p.Log)))
	}
	t.Fatalf("start %s: %v", name, err)
	return nil
}

// waitHTTP polls check until it passes, the process exits or time is up.
func waitHTTP(p *node.Process, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.Done:
			return fmt.Errorf("%s exited: %v", p.Name, p.Err)
		default:
		}
		if last = check(); last == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %v: %v", p.Name, timeout, last)
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
