package reliability_test

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
	"github.com/qoscni/qoscni/test/reliability/reltest"
)

// network is the CNI network name of every config here.
const (
	network   = "qrel"
	bridge    = "qrbr0"
	tableName = "qoscni"
	// refBridge is the reference bridge plugin's bridge in chained mode.
	refBridge = "qrcbr0"
)

// sharedDev are the node's devices that stay when no pod is left.
var sharedDev = map[string]bool{"lo": true, bridge: true, refBridge: true}

// podLink: qoscni's host veths (qv*) and IFBs (qi*), and the reference
// bridge plugin's host veths (veth*) in chained mode.
func podLink(name string) bool {
	return strings.HasPrefix(name, "qv") || strings.HasPrefix(name, "qi") || strings.HasPrefix(name, "veth")
}

// hostLocalDir is where the reference host-local IPAM keeps reservations
// in chained mode (same file layout: one file per address).
func hostLocalDir(node *testnet.Node) string { return filepath.Join(node.Dir, "host-local") }

var (
	binMu   sync.Mutex
	binDir  string
	binDone = map[string]string{}
	binErr  = map[string]error{}
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// taggedBinary builds ./cmd/<name> with the faultinject tag, once per test
// process, statically as `make build` does.
func taggedBinary(t testing.TB, name string) string {
	t.Helper()
	binMu.Lock()
	defer binMu.Unlock()
	if p, ok := binDone[name]; ok {
		return p
	}
	if err, ok := binErr[name]; ok {
		t.Fatal(err)
	}
	if binDir == "" {
		d, err := os.MkdirTemp("", "qoscni-fault-bin-")
		if err != nil {
			t.Fatal(err)
		}
		binDir = d
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	out := filepath.Join(binDir, name)
	cmd := exec.Command(goTool(), "build", "-tags", "faultinject", "-trimpath", "-o", out, "./cmd/"+name)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		binErr[name] = fmt.Errorf("go build -tags faultinject ./cmd/%s: %v\n%s", name, err, b)
		t.Fatal(binErr[name])
	}
	binDone[name] = out
	return out
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if g := os.Getenv("GOROOT"); g != "" {
		return filepath.Join(g, "bin", "go")
	}
	return "/usr/local/go/bin/go"
}

// call is one plugin invocation; fault names the point to die at.
type call struct {
	cmd, cid, netns, ifname, args string
	conf                          []byte
	fault                         string
}

// result is how the plugin ended.
type result struct {
	stdout, stderr []byte
	killed         bool // by SIGKILL: the fault point was reached
	failed         bool // exited non-zero or was killed
	cniErr         *types.Error
	runErr         error
}

func (r result) String() string {
	switch {
	case r.killed:
		return "killed by SIGKILL"
	case r.failed && r.cniErr != nil:
		return fmt.Sprintf("error %d: %s (%s); stderr %q", r.cniErr.Code, r.cniErr.Msg, r.cniErr.Details, r.stderr)
	case r.failed:
		return fmt.Sprintf("failed: %v; stdout %q stderr %q", r.runErr, r.stdout, r.stderr)
	}
	return "ok"
}

// invoke runs the tagged plugin inside the node namespace, as a runtime
// on that node would.
func invoke(t testing.TB, node *testnet.Node, c call) result {
	t.Helper()
	bin := taggedBinary(t, "qoscni")
	return invokeBin(t, node, bin, filepath.Dir(bin), c)
}

// invokeBin runs a CNI plugin binary inside the node namespace.
func invokeBin(t testing.TB, node *testnet.Node, bin, cniPath string, c call) result {
	t.Helper()
	env := []string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=" + c.cmd, "CNI_PATH=" + cniPath, state.RegistryEnv + "=" + node.Registry}
	set := func(k, v string) {
		if v != "" {
			env = append(env, k+"="+v)
		}
	}
	set("CNI_CONTAINERID", c.cid)
	set("CNI_NETNS", c.netns)
	set("CNI_IFNAME", c.ifname)
	set("CNI_ARGS", c.args)
	set("QOSCNI_FAULT", c.fault)
	cmd := exec.Command(bin)
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(c.conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := startIn(node.Path, cmd); err != nil {
		t.Fatalf("start %s in %s: %v", c.cmd, node.Name, err)
	}
	err := cmd.Wait()
	r := result{stdout: stdout.Bytes(), stderr: stderr.Bytes(), runErr: err}
	if err == nil {
		return r
	}
	r.failed = true
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			r.killed = true
			return r
		}
	}
	e := &types.Error{}
	if json.Unmarshal(r.stdout, e) == nil && (e.Code != 0 || e.Msg != "") {
		r.cniErr = e
	}
	return r
}

// startIn starts cmd inside the network namespace at nsPath: it is forked
// from a thread that joined the namespace, which is what `ip netns exec`
// does minus one process (the harness forks hundreds). The thread is never
// unlocked, so it dies with its goroutine instead of going back to the pool.
func startIn(nsPath string, cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- cmd.Start()
	}()
	return <-errc
}

// newPodNS makes a pod namespace under /run/netns, removed at cleanup
// (testnet.NewNS without its two ip commands).
func newPodNS(t testing.TB) *testnet.NS {
	t.Helper()
	name := testnet.Unique("qp")
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread is in the new namespace
		h, err := vnetns.NewNamed(name)
		if err == nil {
			h.Close()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() { _ = vnetns.DeleteNamed(name) })
	return &testnet.NS{Name: name, Path: filepath.Join("/run/netns", name)}
}

// waitVethGone waits until the kernel has destroyed the host end of a
// deleted pod netns's veth: it does so asynchronously (cleanup_net), and a
// runtime acts on a dead sandbox much later than a test does.
func waitVethGone(t testing.TB, node *testnet.Node, cid string) {
	t.Helper()
	fd, err := unix.Open(node.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open node netns: %v", err)
	}
	defer unix.Close(fd)
	h, err := netlink.NewHandleAt(vnetns.NsHandle(fd))
	if err != nil {
		t.Fatalf("netlink in node: %v", err)
	}
	defer h.Close()
	name := podnet.HostVethName(cid, "eth0")
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := h.LinkByName(name); err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return
			}
			t.Fatalf("look up %s: %v", name, err)
		}
	}
	t.Fatalf("%s still exists 10 s after its pod netns was deleted", name)
}

// deletePodNS removes a pod namespace as a runtime does when the sandbox goes.
func deletePodNS(t testing.TB, ns *testnet.NS) {
	t.Helper()
	if err := vnetns.DeleteNamed(ns.Name); err != nil {
		t.Fatalf("delete netns %s: %v", ns.Name, err)
	}
}

// profile is what one pod asks for.
type profile struct {
	name    string
	ingress bool
	egress  bool
	ports   []map[string]any
	// controls: packet-rate, connection and DSCP annotations.
	controls bool
	// policy: the network enforces NetworkPolicy (ADD's pending step).
	policy bool
}

var (
	profFull = profile{name: "full", ingress: true, egress: true, ports: []map[string]any{
		{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"},
		{"hostPort": 18053, "containerPort": 53, "protocol": "udp"},
	}, controls: true, policy: true}
	profEgress = profile{name: "egress", egress: true, ports: []map[string]any{
		{"HostPort": 18081, "ContainerPort": 81, "Protocol": "UDP"}, // containerd's spelling
	}}
	profPlain = profile{name: "plain"}
)

// standaloneNet is the standalone network: bridge, built-in IPAM with an
// IPv4 and an IPv6 range under the node's directory, ipMasq.
var standaloneNet = reltest.Net{Name: network, Bridge: bridge, PodAnnotations: true, Ranges: []map[string]any{
	{"subnet": "10.79.0.0/24"},
	{"subnet": "fd79::/64"},
}}

// addConf is the config a runtime sends at ADD for a pod of profile p
// (the same runtimeConfig goes with its first DEL).
func addConf(node *testnet.Node, p profile) []byte {
	c := standaloneNet.BaseConf(node)
	rc := map[string]any{}
	bw := map[string]any{}
	if p.ingress {
		bw["ingressRate"], bw["ingressBurst"] = 10_000_000, 4294967295
	}
	if p.egress {
		bw["egressRate"], bw["egressBurst"] = 20_000_000, 4294967295
	}
	if len(bw) > 0 {
		rc["bandwidth"] = bw
	}
	if len(p.ports) > 0 {
		list := make([]any, 0, len(p.ports))
		for _, m := range p.ports {
			list = append(list, m)
		}
		rc["portMappings"] = list
	}
	if p.controls {
		rc["io.kubernetes.cri.pod-annotations"] = map[string]string{
			shaping.AnnotationIngressPacketRate: "5k", shaping.AnnotationEgressMaxConnections: "100", shaping.AnnotationDSCP: "AF41",
		}
	}
	c["runtimeConfig"] = rc
	if p.policy {
		c["policy"] = map[string]any{"type": "k8s"}
	}
	return reltest.Marshal(c)
}

// plainConf is the config without runtimeConfig (containerd's second DEL).
func plainConf(node *testnet.Node) []byte { return reltest.Marshal(standaloneNet.BaseConf(node)) }

func podArgs(cid string) string {
	return "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + cid + ";K8S_POD_UID=uid-" + cid
}

// leaks is what the node holds of any attachment.
type leaks struct {
	links, qdiscs, nft, ipam, state []string
}

func (l leaks) total() int {
	return len(l.links) + len(l.qdiscs) + len(l.nft) + len(l.ipam) + len(l.state)
}

func (l leaks) String() string {
	var parts []string
	add := func(what string, v []string) {
		if len(v) > 0 {
			parts = append(parts, fmt.Sprintf("%s %d %v", what, len(v), v))
		}
	}
	add("links", l.links)
	add("qdiscs", l.qdiscs)
	add("nft elements", l.nft)
	add("ipam files", l.ipam)
	add("state records", l.state)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, "; ")
}

// counts is what toolLeaks and countLeaks must agree on (their element
// and handle spellings differ).
func (l leaks) counts() string {
	links := append([]string(nil), l.links...)
	sort.Strings(links)
	return fmt.Sprintf("links %v, %d qdiscs, %d nft elements, %d ipam files, %d state records", links, len(l.qdiscs), len(l.nft), len(l.ipam), len(l.state))
}

// crossCheck compares the netlink count with the tools' count.
func crossCheck(t testing.TB, node *testnet.Node) {
	t.Helper()
	if tools, nl := toolLeaks(t, node), countLeaks(t, node); tools.counts() != nl.counts() {
		t.Errorf("cross-check: ip/tc/nft see %s (%s), netlink/nftables see %s (%s)", tools.counts(), tools, nl.counts(), nl)
	}
}

// countLeaks inspects the node through netlink and nftables: pod links
// (qv* veths, qi* IFBs, veth*), qdiscs on anything but lo and the bridges,
// elements of every set and map of table inet qoscni but the shared
// masq-skip-dst sets; and the directories: reservation and index files of
// the IPAM store, state records. The bridge and the table's fixed chains
// and sets are shared by all pods and may stay. toolLeaks counts the same
// with ip, tc and nft.
func countLeaks(t testing.TB, node *testnet.Node) leaks {
	t.Helper()
	fd, err := unix.Open(node.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open node netns: %v", err)
	}
	defer unix.Close(fd)
	h, err := netlink.NewHandleAt(vnetns.NsHandle(fd))
	if err != nil {
		t.Fatalf("netlink in node: %v", err)
	}
	defer h.Close()
	var l leaks
	links, err := h.LinkList()
	if err != nil {
		t.Fatalf("list links: %v", err)
	}
	names := map[int]string{}
	for _, k := range links {
		a := k.Attrs()
		names[a.Index] = a.Name
		if podLink(a.Name) {
			l.links = append(l.links, a.Name)
		}
	}
	qdiscs, err := h.QdiscList(nil)
	if err != nil {
		t.Fatalf("list qdiscs: %v", err)
	}
	for _, q := range qdiscs {
		a := q.Attrs()
		if dev := names[a.LinkIndex]; !sharedDev[dev] {
			l.qdiscs = append(l.qdiscs, fmt.Sprintf("%s:%s:%x:", dev, q.Type(), a.Handle>>16))
		}
	}
	conn, err := nftables.New(nftables.WithNetNSFd(fd))
	if err != nil {
		t.Fatalf("nftables in node: %v", err)
	}
	defer conn.CloseLasting()
	if table, err := conn.ListTableOfFamily(tableName, nftables.TableFamilyINet); err == nil {
		sets, err := conn.GetSets(table)
		if err != nil {
			t.Fatalf("list sets of %s: %v", tableName, err)
		}
		for _, s := range sets {
			if sharedSets[s.Name] {
				continue
			}
			elems, err := conn.GetSetElements(s)
			if err != nil {
				t.Fatalf("list elements of %s: %v", s.Name, err)
			}
			for _, e := range elems {
				l.nft = append(l.nft, s.Name+"="+elemString(s, e))
			}
		}
	} else if !errors.Is(err, unix.ENOENT) {
		t.Fatalf("look up table inet %s: %v", tableName, err)
	}
	l.ipam = append(ipamLeftovers(t, filepath.Join(node.IPAMDir, network)), ipamLeftovers(t, filepath.Join(hostLocalDir(node), network))...)
	l.state = stateLeftovers(t, node.StateDir)
	return l
}

func elemString(s *nftables.Set, e nftables.SetElement) string {
	if (s.KeyType == nftables.TypeIPAddr || s.KeyType == nftables.TypeIP6Addr) && (len(e.Key) == 4 || len(e.Key) == 16) {
		return net.IP(e.Key).String()
	}
	out := hex.EncodeToString(e.Key)
	if s.IsMap {
		out += ":" + hex.EncodeToString(e.Val)
	}
	if e.Comment != "" {
		out += " (" + e.Comment + ")"
	}
	return out
}

// toolLeaks counts the node's kernel leftovers with the kernel's own tools
// (ip -j link, tc -j qdisc, nft -j list table), a cross-check of
// countLeaks that does not share its netlink libraries.
func toolLeaks(t testing.TB, node *testnet.Node) leaks {
	t.Helper()
	const sep = "\n@@qoscni@@\n"
	script := `ip -j link show; printf '` + strings.ReplaceAll(sep, "\n", `\n`) + `'; tc -j qdisc show; printf '` +
		strings.ReplaceAll(sep, "\n", `\n`) + `'; nft -j list table inet qoscni 2>/dev/null || true`
	out, err := exec.Command("ip", "netns", "exec", node.Name, "sh", "-c", script).Output()
	if err != nil {
		t.Fatalf("inspect node %s: %v", node.Name, err)
	}
	parts := strings.Split(string(out), sep)
	if len(parts) != 3 {
		t.Fatalf("inspect node %s: unexpected output %q", node.Name, out)
	}
	var l leaks
	var links []struct {
		Name string `json:"ifname"`
	}
	if err := json.Unmarshal([]byte(parts[0]), &links); err != nil {
		t.Fatalf("ip -j link: %v: %s", err, parts[0])
	}
	for _, k := range links {
		if podLink(k.Name) {
			l.links = append(l.links, k.Name)
		}
	}
	var qdiscs []struct {
		Kind   string `json:"kind"`
		Handle string `json:"handle"`
		Dev    string `json:"dev"`
	}
	if err := json.Unmarshal([]byte(parts[1]), &qdiscs); err != nil {
		t.Fatalf("tc -j qdisc: %v: %s", err, parts[1])
	}
	for _, q := range qdiscs {
		if !sharedDev[q.Dev] {
			l.qdiscs = append(l.qdiscs, q.Dev+":"+q.Kind+":"+q.Handle)
		}
	}
	if s := strings.TrimSpace(parts[2]); s != "" {
		var doc struct {
			Nftables []map[string]json.RawMessage `json:"nftables"`
		}
		if err := json.Unmarshal([]byte(s), &doc); err != nil {
			t.Fatalf("nft -j: %v: %s", err, s)
		}
		for _, obj := range doc.Nftables {
			for _, kind := range []string{"set", "map"} {
				raw, ok := obj[kind]
				if !ok {
					continue
				}
				var set struct {
					Name string            `json:"name"`
					Elem []json.RawMessage `json:"elem"`
				}
				if err := json.Unmarshal(raw, &set); err != nil {
					t.Fatalf("nft -j %s: %v", kind, err)
				}
				if sharedSets[set.Name] {
					continue
				}
				for _, e := range set.Elem {
					l.nft = append(l.nft, set.Name+"="+compact(e))
				}
			}
		}
	}
	l.ipam = append(ipamLeftovers(t, filepath.Join(node.IPAMDir, network)), ipamLeftovers(t, filepath.Join(hostLocalDir(node), network))...)
	l.state = stateLeftovers(t, node.StateDir)
	return l
}

// sharedSets hold the network's subnets and multicast (destinations that
// are never masqueraded): shared by every pod like the bridge, not per pod.
var sharedSets = map[string]bool{"masq-skip-dst4": true, "masq-skip-dst6": true}

func compact(b []byte) string {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return string(b)
	}
	s := buf.String()
	if len(s) > 120 {
		s = s[:120] + "..."
	}
	return s
}

// ipamLeftovers lists address reservations, attachment index entries and
// temporary files of the store (the lock and the last-reserved hints are
// the store's own).
func ipamLeftovers(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read ipam dir: %v", err)
	}
	for _, e := range entries {
		name := e.Name()
		switch {
		case e.IsDir():
			sub, _ := os.ReadDir(filepath.Join(dir, name))
			for _, s := range sub {
				out = append(out, name+"/"+s.Name())
			}
		case name == "lock" || strings.HasPrefix(name, "last_reserved_ip."):
		default:
			if _, err := netip.ParseAddr(name); err == nil || strings.Contains(name, "tmp") {
				out = append(out, name)
			}
		}
	}
	sort.Strings(out)
	return out
}

// stateLeftovers lists the network's records (decodable or not) and any
// temporary file of an interrupted write.
func stateLeftovers(t testing.TB, dir string) []string {
	t.Helper()
	recs, bad, err := state.New(dir).List(network)
	if err != nil {
		t.Fatalf("list state records: %v", err)
	}
	var out []string
	for _, r := range recs {
		out = append(out, r.ContainerID+"_"+r.IfName)
	}
	for _, b := range bad {
		out = append(out, "bad:"+filepath.Base(b.Path))
	}
	entries, _ := os.ReadDir(filepath.Join(dir, network))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			out = append(out, "tmp:"+e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// scrub returns a leaky node to a clean slate so the trials after a found
// leak still measure only themselves.
func scrub(t testing.TB, node *testnet.Node) {
	t.Helper()
	l := countLeaks(t, node)
	for _, name := range l.links {
		_, _ = node.Try("ip", "link", "del", name)
	}
	_, _ = node.Try("nft", "delete", "table", "inet", "qoscni")
	for _, d := range []string{node.StateDir, node.IPAMDir, hostLocalDir(node)} {
		if err := os.RemoveAll(d); err != nil {
			t.Fatalf("scrub %s: %v", d, err)
		}
	}
}
