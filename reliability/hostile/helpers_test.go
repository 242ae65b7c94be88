package hostile_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/qoscni/qoscni/internal/testnet"
)

const (
	network    = "qhostile"
	bridge     = "qhbr0"
	cniVersion = "1.1.0"
)

// baseConf is the standalone config of the tests here. The ranges are
// small (40 addresses each) so that a test can hand out every free address
// and see that none of those already on disk comes out.
func baseConf(n *testnet.Node) map[string]any {
	return map[string]any{
		"cniVersion":       cniVersion,
		"name":             network,
		"type":             "qoscni",
		"bridge":           bridge,
		"isDefaultGateway": true,
		"ipMasq":           true,
		"hairpinMode":      true,
		"stateDir":         n.StateDir,
		"capabilities":     map[string]any{"bandwidth": true, "portMappings": true},
		"ipam": map[string]any{
			"ranges": []any{
				[]any{map[string]any{"subnet": "10.97.0.0/24", "rangeStart": "10.97.0.10", "rangeEnd": "10.97.0.49"}},
				[]any{map[string]any{"subnet": "fd97::/64", "rangeStart": "fd97::10", "rangeEnd": "fd97::37"}},
			},
			"dataDir": n.IPAMDir,
		},
	}
}

// confWith is baseConf changed by mutate.
func confWith(n *testnet.Node, mutate func(map[string]any)) []byte {
	c := baseConf(n)
	if mutate != nil {
		mutate(c)
	}
	return marshal(c)
}

// shapedPorts gives a pod shaping both ways and the hostPorts listed.
func shapedPorts(hostPorts ...int) func(map[string]any) {
	return func(c map[string]any) {
		rc := map[string]any{"bandwidth": map[string]any{"ingressRate": 10_000_000, "ingressBurst": 200_000, "egressRate": 20_000_000, "egressBurst": 200_000}}
		var pms []any
		for _, hp := range hostPorts {
			pms = append(pms, map[string]any{"hostPort": hp, "containerPort": 80, "protocol": "tcp"})
		}
		if len(pms) > 0 {
			rc["portMappings"] = pms
		}
		c["runtimeConfig"] = rc
	}
}

func marshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// podConf gives pod i of a round its runtimeConfig: i%4 == 1 shaped,
// 2 a hostPort, 3 both, 0 plain.
func podConf(n *testnet.Node, i int) []byte {
	c := baseConf(n)
	rc := map[string]any{}
	if i%4 == 1 || i%4 == 3 {
		rc["bandwidth"] = map[string]any{"ingressRate": 10_000_000, "ingressBurst": 200_000, "egressRate": 20_000_000, "egressBurst": 200_000}
	}
	if i%4 >= 2 {
		rc["portMappings"] = []any{map[string]any{"hostPort": 20000 + i, "containerPort": 80, "protocol": "tcp"}}
	}
	if len(rc) > 0 {
		c["runtimeConfig"] = rc
	}
	return marshal(c)
}

// gcConf lists the attachments ("containerID/ifname") the runtime still knows.
func gcConf(n *testnet.Node, valid ...string) []byte {
	c := baseConf(n)
	list := make([]any, 0, len(valid))
	for _, v := range valid {
		cid, ifname, _ := strings.Cut(v, "/")
		list = append(list, map[string]any{"containerID": cid, "ifname": ifname})
	}
	c["cni.dev/valid-attachments"] = list
	return marshal(c)
}

// withPrev adds the ADD result as prevResult, as a runtime does for CHECK.
func withPrev(conf, prev []byte) []byte {
	var c, p map[string]any
	if err := json.Unmarshal(conf, &c); err != nil {
		panic(err)
	}
	if err := json.Unmarshal(prev, &p); err != nil {
		panic(err)
	}
	c["prevResult"] = p
	return marshal(c)
}

// call is one plugin invocation.
type call struct {
	cmd, cid, netns, ifname, args string
	conf                          []byte
	umask0                        bool // run the plugin under umask 000
}

// outcome is how an invocation ended and how long it took.
type outcome struct {
	stdout, stderr []byte
	err            *types.Error // nil on success
	took           time.Duration
	hung           bool // killed by the test's deadline
}

func (o outcome) String() string {
	switch {
	case o.hung:
		return fmt.Sprintf("hung: killed after %v", o.took.Round(time.Millisecond))
	case o.err != nil:
		return fmt.Sprintf("error %d: %s (%s); stderr %q", o.err.Code, o.err.Msg, o.err.Details, o.stderr)
	}
	return "ok"
}

// invoke runs the built plugin inside the node namespace as testnet.Invoke
// does, but kills it after limit so that a hang is a failure, not a stuck
// test. The measured time includes `ip netns exec`, as a runtime's fork
// and exec would.
func invoke(t testing.TB, n *testnet.Node, c call, limit time.Duration) outcome {
	t.Helper()
	bin := testnet.PluginBinary(t)
	env := []string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=" + c.cmd, "CNI_PATH=" + filepath.Dir(bin)}
	for k, v := range map[string]string{"CNI_CONTAINERID": c.cid, "CNI_NETNS": c.netns, "CNI_IFNAME": c.ifname, "CNI_ARGS": c.args} {
		if v != "" {
			env = append(env, k+"="+v)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	argv := []string{"netns", "exec", n.Name, bin}
	if c.umask0 {
		argv = []string{"netns", "exec", n.Name, "sh", "-c", `umask 000 && exec "$0"`, bin}
	}
	cmd := exec.CommandContext(ctx, "ip", argv...)
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(c.conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	o := outcome{stdout: stdout.Bytes(), stderr: stderr.Bytes(), took: time.Since(start)}
	if err == nil {
		return o
	}
	if ctx.Err() != nil {
		o.hung = true
		o.err = &types.Error{Code: 999, Msg: "killed by the test deadline"}
		return o
	}
	e := &types.Error{}
	if jerr := json.Unmarshal(o.stdout, e); jerr != nil || (e.Code == 0 && e.Msg == "") {
		e = &types.Error{Code: 999, Msg: fmt.Sprintf("plugin exited %v without a CNI error; stdout %q", err, o.stdout)}
	}
	o.err = e
	return o
}

// addrs decodes the IPs of an ADD result (t.Errorf, not Fatal: callers
// run it in goroutines).
func addrs(t testing.TB, stdout []byte) []string {
	t.Helper()
	res, err := version.NewResult(cniVersion, stdout)
	if err != nil {
		t.Errorf("decode ADD result: %v\n%s", err, stdout)
		return nil
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		t.Errorf("convert ADD result: %v", err)
		return nil
	}
	var out []string
	for _, ipc := range cur.IPs {
		out = append(out, ipc.Address.IP.String())
	}
	return out
}

// snapshot is everything a pod can leave in the node: links, addresses,
// routes, qdiscs, the qoscni nftables table (stateless listing, so packet
// counters do not count), and the entries of the IPAM and state
// directories with their modes. The round-robin hints move between rounds
// by design, so only their presence counts.
type snapshot map[string][]string

func takeSnapshot(t testing.TB, n *testnet.Node) snapshot {
	t.Helper()
	s := snapshot{}
	lines := func(out string) []string {
		var l []string
		for _, x := range strings.Split(out, "\n") {
			// Carrier and DAD state follow the bridge's ports asynchronously.
			x = strings.ReplaceAll(strings.ReplaceAll(x, " linkdown", ""), " tentative", "")
			if x = strings.TrimSpace(x); x != "" {
				l = append(l, x)
			}
		}
		sort.Strings(l)
		return l
	}
	var links []string
	for _, l := range lines(n.Exec(t, "ip", "-o", "link", "show")) {
		// "3: qsbr0: <...> mtu ... state UP ..." minus the index and the
		// operational state, which follows the bridge's ports.
		f := strings.Fields(l)
		if len(f) > 1 {
			links = append(links, strings.TrimSuffix(f[1], ":"))
		}
	}
	sort.Strings(links)
	s["links"] = links
	s["addrs"] = lines(n.Exec(t, "ip", "-o", "addr", "show"))
	s["routes4"] = lines(n.Exec(t, "ip", "-4", "route", "show", "table", "all"))
	// The kernel adds local and anycast routes for a link's fe80:: address
	// when its DAD is done, asynchronously: those of pod veths are theirs.
	for _, r := range lines(n.Exec(t, "ip", "-6", "route", "show", "table", "all")) {
		if !(strings.Contains(r, "fe80:") && strings.Contains(r, "table local") && strings.Contains(r, "dev qv")) {
			s["routes6"] = append(s["routes6"], r)
		}
	}
	s["qdiscs"] = lines(n.Exec(t, "tc", "qdisc", "show"))
	if out, err := n.Try("nft", "-s", "list", "table", "inet", "qoscni"); err == nil {
		s["nft"] = lines(out)
	}
	for _, d := range []struct{ key, dir string }{{"ipam", n.IPAMDir}, {"state", n.StateDir}} {
		var entries []string
		err := filepath.WalkDir(d.dir, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			info, err := e.Info()
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(d.dir, p)
			entries = append(entries, fmt.Sprintf("%s %v", rel, info.Mode()))
			return nil
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("walk %s: %v", d.dir, err)
		}
		sort.Strings(entries)
		s[d.key] = entries
	}
	return s
}

// diff lists what b has that a lacks (+) and the reverse (-).
func (a snapshot) diff(b snapshot) []string {
	var out []string
	keys := map[string]bool{}
	for k := range a {
		keys[k] = true
	}
	for k := range b {
		keys[k] = true
	}
	var sorted []string
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	for _, k := range sorted {
		in := func(l []string) map[string]int {
			m := map[string]int{}
			for _, x := range l {
				m[x]++
			}
			return m
		}
		ma, mb := in(a[k]), in(b[k])
		for x, c := range mb {
			if ma[x] < c {
				out = append(out, k+" + "+x)
			}
		}
		for x, c := range ma {
			if mb[x] < c {
				out = append(out, k+" - "+x)
			}
		}
	}
	sort.Strings(out)
	return out
}

// percentile of sorted durations (nearest rank).
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(p*float64(len(d))+0.999999) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(d) {
		i = len(d) - 1
	}
	return d[i]
}

func stats(d []time.Duration) string {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	r := func(x time.Duration) time.Duration { return x.Round(time.Millisecond) }
	return fmt.Sprintf("p50 %v p99 %v max %v", r(percentile(s, 0.50)), r(percentile(s, 0.99)), r(percentile(s, 1)))
}
