package podnet

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/sysctl"
	"github.com/qoscni/qoscni/internal/testnet"
)

// wantBrnfError checks err is the CNI error 51 and its message names the
// module, the sysctl and each of hints.
func wantBrnfError(t *testing.T, err error, sysctlName string, hints ...string) {
	t.Helper()
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("want a CNI error, got %v", err)
	}
	if te.Code != types.ErrLimitedConnectivity {
		t.Errorf("code %d, want %d: %s", te.Code, types.ErrLimitedConnectivity, te.Msg)
	}
	for _, h := range append([]string{"br_netfilter", sysctlName, "Service", "docs/install.md"}, hints...) {
		if !strings.Contains(te.Msg, h) {
			t.Errorf("message does not say %q: %s", h, te.Msg)
		}
	}
}

// The decision, state by state.
func TestBridgeNFProblem(t *testing.T) {
	const v4 = "net.bridge.bridge-nf-call-iptables"
	missing := fmt.Errorf("read sysctl %s: %w", BridgeNFCallIPTables, fs.ErrNotExist)
	rofs := fmt.Errorf("set sysctl: %w", unix.EROFS)
	for _, c := range []struct {
		name  string
		st    bridgeNFState
		ok    bool
		hints []string
	}{
		{"on", bridgeNFState{Path: BridgeNFCallIPTables, Value: "1"}, true, nil},
		{"on, ensure", bridgeNFState{Path: BridgeNFCallIPTables, Value: "1", Ensure: true}, true, nil},
		{"off, set back", bridgeNFState{Path: BridgeNFCallIPTables, Value: "0", Ensure: true}, true, nil},
		{"module missing", bridgeNFState{Path: BridgeNFCallIPTables, ReadErr: missing, Ensure: true}, false,
			[]string{"not loaded", "modprobe br_netfilter", "/etc/modules-load.d/"}},
		{"module missing, read only", bridgeNFState{Path: BridgeNFCallIPTables, ReadErr: missing}, false,
			[]string{"not loaded", "modprobe br_netfilter"}},
		{"off, cannot set", bridgeNFState{Path: BridgeNFCallIPTables, Value: "0", Ensure: true, WriteErr: rofs}, false,
			[]string{"is 0", "cannot be set to 1", "read-only file system", "sysctl -w " + v4 + "=1", "/etc/sysctl.d/"}},
		{"off, read only", bridgeNFState{Path: BridgeNFCallIPTables, Value: "0"}, false,
			[]string{"is 0", "next ADD or STATUS", "sysctl -w " + v4 + "=1"}},
		{"unreadable", bridgeNFState{Path: BridgeNFCallIPTables, ReadErr: fmt.Errorf("read: %w", unix.EACCES), Ensure: true}, false,
			[]string{"cannot be read", "permission denied"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.st.problem()
			if c.ok {
				if err != nil {
					t.Fatalf("want no problem, got %v", err)
				}
				return
			}
			wantBrnfError(t, err, v4, c.hints...)
			t.Log(err)
		})
	}
	// The IPv6 one names itself.
	err := bridgeNFState{Path: BridgeNFCallIP6Tables, Value: "0"}.problem()
	wantBrnfError(t, err, "net.bridge.bridge-nf-call-ip6tables")
}

// fakeProcSys is a /proc/sys of plain files: net/bridge holds the two
// sysctls with the given values, or is absent (no values): the module is
// not loaded.
func fakeProcSys(t *testing.T, values ...string) sysctl.Tree {
	t.Helper()
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "net", "ipv4"), 0o755); err != nil {
		t.Fatal(err)
	}
	if len(values) > 0 {
		if err := os.MkdirAll(filepath.Join(root, "net", "bridge"), 0o755); err != nil {
			t.Fatal(err)
		}
		for i, p := range bridgeNFSysctls {
			if err := os.WriteFile(filepath.Join(root, p), []byte(values[i]+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return sysctl.Tree(root)
}

// The detection through an injected /proc/sys: the module's absence is
// seen and named, by Ensure (plugin, install) and Check (agent) alike.
func TestBridgeNetfilterTree(t *testing.T) {
	absent := BridgeNetfilter{ProcSys: fakeProcSys(t), NetnsFd: sysctl.Current}
	_, err := absent.Ensure()
	wantBrnfError(t, err, "net.bridge.bridge-nf-call-iptables", "not loaded")
	wantBrnfError(t, absent.Check(), "net.bridge.bridge-nf-call-iptables", "not loaded")

	off := BridgeNetfilter{ProcSys: fakeProcSys(t, "1", "0"), NetnsFd: sysctl.Current}
	wantBrnfError(t, off.Check(), "net.bridge.bridge-nf-call-ip6tables", "is 0")
	found, err := off.Ensure()
	if err != nil {
		t.Fatal(err)
	}
	want := []SysctlFound{{"net.bridge.bridge-nf-call-iptables", "1"}, {"net.bridge.bridge-nf-call-ip6tables", "0"}}
	if fmt.Sprint(found) != fmt.Sprint(want) || found[0].Changed() || !found[1].Changed() {
		t.Errorf("Ensure found %v, want %v", found, want)
	}
	for _, p := range bridgeNFSysctls {
		if v, _ := off.ProcSys.Get(sysctl.Current, p); v != "1" {
			t.Errorf("%s = %q after Ensure", p, v)
		}
	}
	if err := off.Check(); err != nil {
		t.Errorf("Check after Ensure: %v", err)
	}
}

// readOnlyProcSys is the process's /proc/sys/net bind-mounted read only
// under a temporary directory (a container's view: runtimes mount
// /proc/sys read only), unmounted at cleanup.
func readOnlyProcSys(t *testing.T) sysctl.Tree {
	t.Helper()
	root := t.TempDir()
	net := filepath.Join(root, "net")
	if err := os.Mkdir(net, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/proc/sys/net", net, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind /proc/sys/net: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(net, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", net, err)
		}
	})
	if err := unix.Mount("", net, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("remount %s read only: %v", net, err)
	}
	return sysctl.Tree(root)
}

// nodeBrnf opens the node's namespace and sets both sysctls there.
func nodeBrnf(t *testing.T, n *testnet.NS, v4, v6 string) int {
	t.Helper()
	requireBridgeSysctls(t, n)
	fd, err := unix.Open(n.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	n.Exec(t, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables="+v4, "net.bridge.bridge-nf-call-ip6tables="+v6)
	return fd
}

// requireBridgeSysctls: the kernel tests of br_netfilter need its sysctls
// in every namespace (the module loaded, Linux 5.3 or later).
func requireBridgeSysctls(t *testing.T, n *testnet.NS) {
	t.Helper()
	if _, err := n.Try("test", "-e", "/proc/sys/"+BridgeNFCallIPTables); err != nil {
		t.Fatalf("no /proc/sys/%s in the node namespace: br_netfilter is not loaded on this machine (modprobe br_netfilter; make deps does)", BridgeNFCallIPTables)
	}
}

// In a node namespace, per namespace: Ensure sets back what was set to
// 0 there, and leaves the test's own namespace alone; through a read-only
// /proc/sys it cannot, and says so.
func TestBridgeNetfilterKernel(t *testing.T) {
	testnet.RequireRoot(t)
	n := testnet.NewNS(t, "qb")
	fd := nodeBrnf(t, n, "0", "0")
	own, err := sysctl.Get(sysctl.Current, BridgeNFCallIPTables)
	if err != nil {
		t.Fatal(err)
	}
	node := BridgeNetfilter{ProcSys: sysctl.Proc, NetnsFd: fd}
	wantBrnfError(t, node.Check(), "net.bridge.bridge-nf-call-iptables", "is 0")

	ro := BridgeNetfilter{ProcSys: readOnlyProcSys(t), NetnsFd: fd}
	_, err = ro.Ensure()
	wantBrnfError(t, err, "net.bridge.bridge-nf-call-iptables", "is 0", "cannot be set to 1", "read-only file system")

	found, err := node.Ensure()
	if err != nil || len(found) != 2 || !found[0].Changed() || !found[1].Changed() {
		t.Fatalf("Ensure: %v, %v", found, err)
	}
	for _, p := range bridgeNFSysctls {
		if v := strings.TrimSpace(n.Exec(t, "cat", "/proc/sys/"+p)); v != "1" {
			t.Errorf("node %s = %s after Ensure", p, v)
		}
	}
	// A read-only /proc/sys does for a node that needs nothing.
	if found, err := ro.Ensure(); err != nil || found[0].Changed() {
		t.Errorf("Ensure through a read-only /proc/sys of a ready node: %v, %v", found, err)
	}
	if v, _ := sysctl.Get(sysctl.Current, BridgeNFCallIPTables); v != own {
		t.Errorf("the test's own namespace went from %s to %s", own, v)
	}
}
