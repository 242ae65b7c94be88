// Package node gives an end-to-end test package a machine of its own to
// stand for a Kubernetes node: a network namespace with an uplink to a
// client namespace, and a private mount namespace in which the host paths
// that containerd, the kubelet and the plugin write (/opt/cni/bin,
// /etc/cni/net.d, /var/lib/kubelet, /run/containerd, some global sysctls,
// ...) are covered by private copies. The test machine is left exactly as
// it was, whatever the test does and however it ends.
//
// Use it as the package's TestMain:
//
//	func TestMain(m *testing.M) { node.Main(m, "QOSCNI_E2E_CRI") }
//
// Main creates the namespaces, runs the test binary again inside them
// (nsenter into the node's network namespace, unshare a mount namespace),
// and removes everything when that child exits. Inside, Get returns the
// node. Without root, or when the package's switch is not set, the child
// is not started and every test of the package skips.
package node

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/testnet"
)

const (
	// innerEnv marks the child: its value is the node's netns name.
	innerEnv = "QOSCNI_E2E_INNER_NODE"
	// clientEnv is the client namespace's name.
	clientEnv = "QOSCNI_E2E_INNER_CLIENT"
	// secondEnv is the second node's netns name.
	secondEnv = "QOSCNI_E2E_INNER_NODE2"

	// The uplink between the node and the client namespace. Addresses
	// matter only inside the two namespaces, so every node uses the same.
	NodeIP     = "192.168.213.1"
	ClientIP   = "192.168.213.2"
	NodeIP6    = "fd00:213::1"
	ClientIP6  = "fd00:213::2"
	uplinkNode = "up0"
	uplinkPeer = "up1"
	// The second node sits on the same segment: the client namespace
	// bridges both uplinks, as a switch would.
	Node2IP     = "192.168.213.3"
	Node2IP6    = "fd00:213::3"
	uplinkPeer2 = "up3"
	clientBr    = "upbr"
)

// Node is the machine the e2e test runs on.
type Node struct {
	// NetNS is the node's network namespace (the test process runs in it;
	// so do containerd, the kubelet and the control plane it starts).
	NetNS *testnet.NS
	// Client is a namespace on the node's uplink, for traffic that comes
	// from outside the node (hostPorts, the metrics scrape).
	Client *testnet.NS
	// IP and IP6 are the node's addresses on the uplink (its InternalIP).
	IP, IP6 string
	// Exec is the command prefix that runs a program on this node: nil
	// for the test's own node (the test process is there already); for
	// the second node, nsenter into its network and mount namespaces.
	Exec []string
}

// Get returns the node; it skips the test outside Main's child.
func Get(t testing.TB) *Node {
	t.Helper()
	name := os.Getenv(innerEnv)
	if name == "" {
		t.Skip("e2e: not inside node.Main (set the package's switch, or run make e2e-cri / e2e-k8s)")
	}
	client := os.Getenv(clientEnv)
	return &Node{
		NetNS:  &testnet.NS{Name: name, Path: filepath.Join("/run/netns", name)},
		Client: &testnet.NS{Name: client, Path: filepath.Join("/run/netns", client)},
		IP:     NodeIP, IP6: NodeIP6,
	}
}

// Second returns the second node: a network namespace on the same segment
// as the first (192.168.213.3) and a mount namespace of its own, covering
// the same host paths as the first node's, so that its containerd and
// kubelet write nothing the first node's see. A process holds that mount
// namespace until the test ends; run programs there with the node's Exec
// prefix.
func Second(t testing.TB, sp *Spawner) *Node {
	t.Helper()
	first := Get(t)
	name := os.Getenv(secondEnv)
	n := &Node{NetNS: &testnet.NS{Name: name, Path: filepath.Join("/run/netns", name)}, Client: first.Client,
		IP: Node2IP, IP6: Node2IP6}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ready := filepath.Join(t.TempDir(), "ready")
	log := filepath.Join(t.TempDir(), "holder.log")
	p, err := sp.StartEnv("node2-mounts", log, []string{holderEnv + "=" + name, holderReadyEnv + "=" + ready, clientEnv + "=" + first.Client.Name},
		"nsenter", "--net="+n.NetNS.Path, "unshare", "--mount", "--propagation", "slave", "--", self)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(t, 5*time.Second) })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		select {
		case <-p.Done:
			t.Fatalf("second node's mount namespace: holder exited: %v\n%s", p.Err, Tail(log))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("second node's mount namespace not ready after 10 s\n%s", Tail(log))
		}
	}
	n.Exec = []string{"nsenter", "--target", strconv.Itoa(p.Cmd.Process.Pid), "--mount", "--net", "--"}
	return n
}

// Main runs the package's tests on a node of their own when the switch
// environment variable is set (to anything but "0"); otherwise they skip.
func Main(m *testing.M, switchEnv string) {
	if name := os.Getenv(holderEnv); name != "" {
		os.Exit(holdMounts(name, os.Getenv(clientEnv), os.Getenv(holderReadyEnv)))
	}
	if os.Getenv(innerEnv) != "" {
		if err := coverHostPaths(os.Getenv(innerEnv), os.Getenv(clientEnv), os.Getenv(secondEnv)); err != nil {
			fmt.Fprintln(os.Stderr, "e2e node:", err)
			os.Exit(1)
		}
		os.Exit(m.Run())
	}
	if v := os.Getenv(switchEnv); v == "" || v == "0" || os.Geteuid() != 0 {
		// Runs the tests, which skip through Get.
		os.Exit(m.Run())
	}
	os.Exit(outer(switchEnv))
}

// outer creates the node and runs this test binary again inside it.
func outer(switchEnv string) int {
	nodeName, clientName, node2Name := testnet.Unique("qe2en"), testnet.Unique("qe2ec"), testnet.Unique("qe2en")
	var undo []func()
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}()
	run := func(args ...string) error {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	for _, n := range []string{nodeName, clientName, node2Name} {
		if err := run("ip", "netns", "add", n); err != nil {
			fmt.Fprintln(os.Stderr, "e2e node:", err)
			return 1
		}
		undo = append(undo, func() {
			killNamespace(filepath.Join("/run/netns", n))
			_ = exec.Command("ip", "netns", "del", n).Run()
		})
	}
	steps := [][]string{
		{"ip", "-n", nodeName, "link", "set", "lo", "up"},
		{"ip", "-n", clientName, "link", "set", "lo", "up"},
		{"ip", "-n", node2Name, "link", "set", "lo", "up"},
		{"ip", "-n", clientName, "link", "add", clientBr, "type", "bridge"},
		{"ip", "-n", nodeName, "link", "add", uplinkNode, "type", "veth", "peer", "name", uplinkPeer, "netns", clientName},
		{"ip", "-n", node2Name, "link", "add", uplinkNode, "type", "veth", "peer", "name", uplinkPeer2, "netns", clientName},
		{"ip", "-n", clientName, "link", "set", uplinkPeer, "master", clientBr},
		{"ip", "-n", clientName, "link", "set", uplinkPeer2, "master", clientBr},
		{"ip", "-n", nodeName, "addr", "add", NodeIP + "/24", "dev", uplinkNode},
		{"ip", "-n", nodeName, "addr", "add", NodeIP6 + "/64", "dev", uplinkNode, "nodad"},
		{"ip", "-n", node2Name, "addr", "add", Node2IP + "/24", "dev", uplinkNode},
		{"ip", "-n", node2Name, "addr", "add", Node2IP6 + "/64", "dev", uplinkNode, "nodad"},
		{"ip", "-n", clientName, "addr", "add", ClientIP + "/24", "dev", clientBr},
		{"ip", "-n", clientName, "addr", "add", ClientIP6 + "/64", "dev", clientBr, "nodad"},
		{"ip", "-n", nodeName, "link", "set", uplinkNode, "up"},
		{"ip", "-n", node2Name, "link", "set", uplinkNode, "up"},
		{"ip", "-n", clientName, "link", "set", uplinkPeer, "up"},
		{"ip", "-n", clientName, "link", "set", uplinkPeer2, "up"},
		{"ip", "-n", clientName, "link", "set", clientBr, "up"},
		// The node's default route is its uplink, as on a real machine:
		// the plugin takes the pods' MTU from the default route's link.
		{"ip", "-n", nodeName, "route", "add", "default", "via", ClientIP},
		{"ip", "-n", nodeName, "-6", "route", "add", "default", "via", ClientIP6},
		{"ip", "-n", node2Name, "route", "add", "default", "via", ClientIP},
		{"ip", "-n", node2Name, "-6", "route", "add", "default", "via", ClientIP6},
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			fmt.Fprintln(os.Stderr, "e2e node:", err)
			return 1
		}
	}
	made, err := makeMountpoints()
	undo = append(undo, func() { removeMountpoints(made) })
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e node:", err)
		return 1
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e node:", err)
		return 1
	}
	args := append([]string{"--net=" + filepath.Join("/run/netns", nodeName), "unshare", "--mount", "--propagation", "slave", "--", self}, os.Args[1:]...)
	cmd := exec.Command("nsenter", args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), innerEnv+"="+nodeName, clientEnv+"="+clientName, secondEnv+"="+node2Name)
	// The child and everything it starts die with this process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		fmt.Fprintln(os.Stderr, "e2e node:", err)
		return 1
	}
	return 0
}

// The second node's mount namespace is held by this test binary run again
// in holder mode: it covers the host paths in its own namespace, says it
// is ready, and waits for the end of the test.
const (
	holderEnv      = "QOSCNI_E2E_MOUNT_HOLDER"
	holderReadyEnv = "QOSCNI_E2E_MOUNT_HOLDER_READY"
)

func holdMounts(nodeName, clientName, ready string) int {
	if err := coverHostPaths(nodeName, clientName); err != nil {
		fmt.Fprintln(os.Stderr, "e2e node2:", err)
		return 1
	}
	if err := os.WriteFile(ready, nil, 0o600); err != nil {
		fmt.Fprintln(os.Stderr, "e2e node2:", err)
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return 0
}
