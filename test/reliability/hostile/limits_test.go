package hostile_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/reliability/reltest"
)

// warmUp ADDs and DELs one pod so that the bridge, the nftables table and
// the store directories exist (the node's steady empty state), waiting
// with the pod attached for the bridge's DAD so that its link-local
// address belongs to that state.
func warmUp(t *testing.T, n *testnet.Node, ns *testnet.NS) reltest.Snapshot {
	t.Helper()
	conf := hostileNet.ConfWith(n, shapedPorts(9999))
	mustOK(t, "warm-up ADD", reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: "warm", Netns: ns.Path, IfName: "eth0", Config: conf}, callLimit))
	for i := 0; i < 200; i++ {
		if out := n.Exec(t, "ip", "-6", "addr", "show", "dev", bridge, "tentative"); strings.TrimSpace(out) == "" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	mustOK(t, "warm-up DEL", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "warm", Netns: ns.Path, IfName: "eth0", Config: conf}, callLimit))
	return reltest.TakeSnapshot(t, n)
}

// limitsEnv is a node in its steady empty state and a pod namespace the
// cases share.
type limitsEnv struct {
	n    *testnet.Node
	pod  *testnet.NS
	base reltest.Snapshot
}

// unchanged checks that the node and the pod are as at the start.
func (e *limitsEnv) unchanged(t *testing.T, what string) {
	t.Helper()
	if d := e.base.Diff(reltest.TakeSnapshot(t, e.n)); len(d) > 0 {
		t.Errorf("%s: the node differs from its start:\n%s", what, strings.Join(d, "\n"))
	}
	if out := e.pod.Exec(t, "ip", "-o", "link"); strings.Count(out, "\n") != 1 {
		t.Errorf("%s: the pod holds more than lo:\n%s", what, out)
	}
}

// refused runs an ADD that must fail with code (0 = any) and a message
// naming want, and change nothing.
func (e *limitsEnv) refused(t *testing.T, c reltest.Call, code uint, want string) reltest.Outcome {
	t.Helper()
	if c.Command == "" {
		c.Command = "ADD"
	}
	o := reltest.Invoke(t, e.n, c, callLimit)
	t.Logf("%s cid %.40q ifname %q netns %q: %s", c.Command, c.ContainerID, c.IfName, c.Netns, o)
	switch {
	case o.Hung:
		t.Errorf("hung")
	case o.Err == nil:
		t.Errorf("accepted")
		// Leave the node clean for the next case.
		_ = reltest.Invoke(t, e.n, reltest.Call{Command: "DEL", ContainerID: c.ContainerID, Netns: c.Netns, IfName: c.IfName, Config: c.Config}, callLimit)
	case code != 0 && o.Err.Code != code:
		t.Errorf("code %d (%s), want %d", o.Err.Code, o.Err.Msg, code)
	case !strings.Contains(o.Err.Msg+" "+o.Err.Details, want):
		t.Errorf("message %q (details %q) does not name %q", o.Err.Msg, o.Err.Details, want)
	}
	e.unchanged(t, "after the refused "+c.Command)
	return o
}

// accepted runs ADD, CHECK and DEL of an attachment and checks that the
// pod had the interface with its addresses and that DEL left nothing.
func (e *limitsEnv) accepted(t *testing.T, cid, ifname, args string, conf []byte) *state.Record {
	t.Helper()
	o := reltest.Invoke(t, e.n, reltest.Call{Command: "ADD", ContainerID: cid, Netns: e.pod.Path, IfName: ifname, Args: args, Config: conf}, callLimit)
	if o.Err != nil {
		t.Errorf("ADD cid %.40q (%d bytes) ifname %q: %s", cid, len(cid), ifname, o)
		e.unchanged(t, "after the failed ADD")
		return nil
	}
	have := e.pod.Exec(t, "ip", "-o", "addr", "show", "dev", ifname)
	for _, ip := range addrs(t, o.Stdout) {
		if !strings.Contains(have, " "+ip+"/") {
			t.Errorf("pod's %s lacks %s: %s", ifname, ip, have)
		}
	}
	rec, err := state.New(e.n.StateDir).Load(state.Key{Network: network, ContainerID: cid, IfName: ifname})
	if err != nil || rec == nil {
		t.Errorf("record of %.40q/%s: %v %v", cid, ifname, rec, err)
	}
	if c := reltest.Invoke(t, e.n, reltest.Call{Command: "CHECK", ContainerID: cid, Netns: e.pod.Path, IfName: ifname, Args: args, Config: reltest.WithPrev(conf, o.Stdout)}, callLimit); c.Err != nil {
		t.Errorf("CHECK: %s", c)
	}
	mustOK(t, "DEL", reltest.Invoke(t, e.n, reltest.Call{Command: "DEL", ContainerID: cid, Netns: e.pod.Path, IfName: ifname, Config: conf}, callLimit))
	e.unchanged(t, "after DEL")
	return rec
}

// TestLimits: interface names, container IDs and pod names at their
// limits and with odd characters; netns paths that are not network
// namespaces; hostIPs and ports at the edges. Valid input works end to end
// and leaves nothing; invalid input is a CNI error naming it, with nothing
// changed.
func TestLimits(t *testing.T) {
	n := testnet.NewNode(t)
	_ = testnet.PluginBinary(t)
	e := &limitsEnv{n: n, pod: n.NewPod(t)}
	e.base = warmUp(t, n, e.pod)
	conf := hostileNet.ConfWith(n, nil)

	t.Run("ifname", func(t *testing.T) {
		for _, ifname := range []string{
			"abcdefghijklmno", // 15 bytes: IFNAMSIZ-1
			"ééééééé0",        // 15 bytes in 8 characters
			"eth-0.1_x",
			"éth0",
		} {
			t.Run(ifname, func(t *testing.T) { e.accepted(t, "if1", ifname, "", conf) })
		}
		for _, ifname := range []string{
			"abcdefghijklmnop", // 16 bytes
			"ééééééé00",        // 16 bytes in 9 characters
			"eth/0", "..", ".", "eth 0", "eth:0", "eth\t0", "eth\u00a00",
		} {
			t.Run(ifname, func(t *testing.T) {
				e.refused(t, reltest.Call{ContainerID: "if2", Netns: e.pod.Path, IfName: ifname, Config: conf}, types.ErrInvalidEnvironmentVariables, "interface name")
			})
		}
		t.Run("empty", func(t *testing.T) {
			e.refused(t, reltest.Call{ContainerID: "if3", Netns: e.pod.Path, Config: conf}, types.ErrInvalidEnvironmentVariables, "CNI_IFNAME")
		})
		// The kernel expands "%d" in a new link's name: the pod would get
		// eth0 while the runtime asked for "eth%d". Either a refusal or a
		// working attachment under the asked name is fine; a stray link
		// is not.
		t.Run("eth%d", func(t *testing.T) {
			o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: "if4", Netns: e.pod.Path, IfName: "eth%d", Config: conf}, callLimit)
			t.Logf("ADD ifname eth%%d: %s", o)
			if o.Err == nil {
				if out := e.pod.Exec(t, "ip", "-o", "link"); !strings.Contains(out, "eth%d") {
					t.Errorf("ADD eth%%d succeeded but the pod has no eth%%d: %s", out)
				}
			}
			mustOK(t, "DEL eth%d", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "if4", Netns: e.pod.Path, IfName: "eth%d", Config: conf}, callLimit))
			e.unchanged(t, "after eth%d")
		})
	})

	t.Run("containerID", func(t *testing.T) {
		long := strings.Repeat("0123456789abcdef", 64) + "tail" // 1028 bytes
		for name, cid := range map[string]string{"1 char": "a", "1028 chars": long, "all allowed punctuation": "A_b.c-D"} {
			t.Run(name, func(t *testing.T) { e.accepted(t, cid, "eth0", "", conf) })
		}
		for _, cid := range []string{"a/b", "../x", "a b", "ünï", "-lead", ".dot", "_under", "a;b", "a%b", "a:b", "x\ny", "a\\b"} {
			t.Run(cid, func(t *testing.T) {
				e.refused(t, reltest.Call{ContainerID: cid, Netns: e.pod.Path, IfName: "eth0", Config: conf}, types.ErrInvalidEnvironmentVariables, "containerID")
			})
		}
		// "_" is legal in both a container ID and an interface name, so
		// a_b/eth0 and a/b_eth0 are two attachments; their records, IPAM
		// entries and devices must not be confused.
		t.Run("a_b/eth0 vs a/b_eth0", func(t *testing.T) {
			var results [2][]byte
			for i, a := range [][2]string{{"a_b", "eth0"}, {"a", "b_eth0"}} {
				o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: a[0], Netns: e.pod.Path, IfName: a[1], Config: conf}, callLimit)
				if o.Err != nil {
					t.Errorf("ADD %s/%s: %s", a[0], a[1], o)
				}
				results[i] = o.Stdout
			}
			// DEL of the second must leave the first whole.
			mustOK(t, "DEL a/b_eth0", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "a", Netns: e.pod.Path, IfName: "b_eth0", Config: conf}, callLimit))
			if results[0] != nil {
				if c := reltest.Invoke(t, n, reltest.Call{Command: "CHECK", ContainerID: "a_b", Netns: e.pod.Path, IfName: "eth0", Config: reltest.WithPrev(conf, results[0])}, callLimit); c.Err != nil {
					t.Errorf("CHECK a_b/eth0 after DEL of a/b_eth0: %s", c)
				}
			}
			mustOK(t, "DEL a_b/eth0", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "a_b", Netns: e.pod.Path, IfName: "eth0", Config: conf}, callLimit))
			e.unchanged(t, "after both DELs")
		})
	})

	t.Run("pod name 253 chars", func(t *testing.T) {
		label := strings.Repeat("p", 63)
		name := label + "." + label + "." + label + "." + strings.Repeat("q", 61) // 63*3+3+61 = 253
		if len(name) != 253 {
			t.Fatalf("name is %d bytes", len(name))
		}
		ns := strings.Repeat("n", 63)
		rec := e.accepted(t, "pn1", "eth0", "K8S_POD_NAMESPACE="+ns+";K8S_POD_NAME="+name+";K8S_POD_UID=0b5c2c1e-8d5f-4c3a-9d1e-2f7a9c7e1a11",
			hostileNet.ConfWith(n, shapedPorts(9001)))
		if rec != nil && (rec.Pod.Name != name || rec.Pod.Namespace != ns) {
			t.Errorf("record holds pod %s/%s", rec.Pod.Namespace, rec.Pod.Name)
		}
	})

	t.Run("netns", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "netns-file")
		if err := os.WriteFile(file, []byte("not a namespace"), 0o600); err != nil {
			t.Fatal(err)
		}
		for name, path := range map[string]string{
			"regular file":    file,
			"directory":       t.TempDir(),
			"mount namespace": "/proc/self/ns/mnt",
			"pid namespace":   "/proc/1/ns/pid",
		} {
			t.Run(name, func(t *testing.T) {
				e.refused(t, reltest.Call{ContainerID: "ns1", Netns: path, IfName: "eth0", Config: conf}, types.ErrInvalidNetNS, path)
				// DEL of what was never added is success whatever the path.
				mustOK(t, "DEL", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "ns1", Netns: path, IfName: "eth0", Config: conf}, callLimit))
				e.unchanged(t, "after DEL")
			})
		}
		t.Run("nonexistent", func(t *testing.T) {
			path := "/run/netns/" + testnet.Unique("qoscni-none-")
			e.refused(t, reltest.Call{ContainerID: "ns2", Netns: path, IfName: "eth0", Config: conf}, 0, path)
			mustOK(t, "DEL", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "ns2", Netns: path, IfName: "eth0", Config: conf}, callLimit))
		})
		t.Run("unset", func(t *testing.T) {
			e.refused(t, reltest.Call{ContainerID: "ns3", IfName: "eth0", Config: conf}, types.ErrInvalidEnvironmentVariables, "CNI_NETNS")
		})
	})

	t.Run("hostIP", func(t *testing.T) {
		for i, hostIP := range []string{"0.0.0.0", "::", "255.255.255.255", "198.51.100.77", "2001:db8::77", "10.97.0.1"} {
			t.Run(hostIP, func(t *testing.T) {
				port := 9100 + i
				c := hostileNet.ConfWith(n, func(c map[string]any) {
					c["runtimeConfig"] = map[string]any{"portMappings": []any{map[string]any{"hostPort": port, "containerPort": 80, "hostIP": hostIP}}}
				})
				o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: "hip", Netns: e.pod.Path, IfName: "eth0", Config: c}, callLimit)
				t.Logf("ADD with hostIP %s: %s", hostIP, o)
				switch {
				case o.Err == nil:
					if !nftHas(t, n, itoa(port)) {
						t.Errorf("accepted hostIP %s but no element for port %d", hostIP, port)
					}
					if chk := reltest.Invoke(t, n, reltest.Call{Command: "CHECK", ContainerID: "hip", Netns: e.pod.Path, IfName: "eth0", Config: reltest.WithPrev(c, o.Stdout)}, callLimit); chk.Err != nil {
						t.Errorf("CHECK: %s", chk)
					}
					mustOK(t, "DEL", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "hip", Netns: e.pod.Path, IfName: "eth0", Config: conf}, callLimit))
				case o.Hung:
					t.Errorf("hung")
				case o.Err.Code != types.ErrInvalidNetworkConfig || !strings.Contains(o.Err.Msg, "hostIP"):
					t.Errorf("refusal of hostIP %s: want code 7 naming hostIP, got %s", hostIP, o)
				}
				e.unchanged(t, "hostIP "+hostIP)
			})
		}
	})

	t.Run("ports", func(t *testing.T) {
		pm := func(hostPort, containerPort int) []byte {
			return hostileNet.ConfWith(n, func(c map[string]any) {
				c["runtimeConfig"] = map[string]any{"portMappings": []any{map[string]any{"hostPort": hostPort, "containerPort": containerPort}}}
			})
		}
		for _, p := range [][2]int{{1, 65535}, {65535, 1}} {
			t.Run(itoa(p[0])+"->"+itoa(p[1]), func(t *testing.T) {
				c := pm(p[0], p[1])
				o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: "port", Netns: e.pod.Path, IfName: "eth0", Config: c}, callLimit)
				if o.Err != nil {
					t.Fatalf("ADD: %s", o)
				}
				if !nftHas(t, n, itoa(p[0])) || !nftHas(t, n, itoa(p[1])) {
					t.Errorf("no element mapping %d to %d", p[0], p[1])
				}
				if chk := reltest.Invoke(t, n, reltest.Call{Command: "CHECK", ContainerID: "port", Netns: e.pod.Path, IfName: "eth0", Config: reltest.WithPrev(c, o.Stdout)}, callLimit); chk.Err != nil {
					t.Errorf("CHECK: %s", chk)
				}
				if rec, _ := state.New(n.StateDir).Load(state.Key{Network: network, ContainerID: "port", IfName: "eth0"}); rec == nil || len(rec.Ports) == 0 || rec.Ports[0].HostPort != p[0] {
					t.Errorf("record ports: %+v", rec)
				}
				mustOK(t, "DEL", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "port", Netns: e.pod.Path, IfName: "eth0", Config: conf}, callLimit))
				e.unchanged(t, "after DEL")
			})
		}
		for _, p := range []struct {
			host, container int
			field           string
		}{{0, 80, "hostPort"}, {65536, 80, "hostPort"}, {-1, 80, "hostPort"}, {80, 0, "containerPort"}, {80, 65536, "containerPort"}} {
			t.Run(itoa(p.host)+"->"+itoa(p.container), func(t *testing.T) {
				e.refused(t, reltest.Call{ContainerID: "port", Netns: e.pod.Path, IfName: "eth0", Config: pm(p.host, p.container)}, types.ErrInvalidNetworkConfig,
					"runtimeConfig.portMappings[0]."+p.field)
			})
		}
	})
	// Nothing of any case is left.
	for _, l := range strings.Split(n.Exec(t, "ip", "-o", "link", "show"), "\n") {
		if f := strings.Fields(l); len(f) > 1 && (strings.HasPrefix(f[1], "qv") || strings.HasPrefix(f[1], "qi")) {
			t.Errorf("device left: %s", f[1])
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
