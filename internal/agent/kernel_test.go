package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/journal"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// inNetns runs fn on a thread switched into the namespace at path; sockets
// created by fn stay in that namespace afterwards.
func inNetns(path string, fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	target, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return err
	}
	defer netns.Set(orig)
	return fn()
}

// shapedPod is a pod namespace wired to the node by a veth whose host end
// has a TBF (into the pod) and whose ingress hook redirects to an IFB with a
// TBF (out of the pod), the layout the plugin builds.
type shapedPod struct {
	ns               *testnet.NS
	hostVeth, ifb    string
	nodeIP, podIP    string
	rec              *state.Record
	inBits, outBits  uint64
	inBurst, inLimit uint64
}

func newShapedPod(t *testing.T, node *testnet.Node, subnet int, inBits, outBits uint64) *shapedPod {
	t.Helper()
	p := &shapedPod{ns: node.NewPod(t), hostVeth: testnet.Unique("qh"), ifb: testnet.Unique("qi"),
		nodeIP: fmt.Sprintf("10.%d.0.1", 100+subnet), podIP: fmt.Sprintf("10.%d.0.2", 100+subnet),
		inBits: inBits, outBits: outBits, inBurst: 12500, inLimit: 125000}
	ip := func(args ...string) { testnet.Run(t, "ip", append([]string{"-n", node.Name}, args...)...) }
	tcn := func(args ...string) { testnet.Run(t, "tc", append([]string{"-n", node.Name}, args...)...) }
	ip("link", "add", p.hostVeth, "type", "veth", "peer", "name", "eth0", "netns", p.ns.Name)
	ip("addr", "add", p.nodeIP+"/24", "dev", p.hostVeth)
	ip("link", "set", p.hostVeth, "up")
	p.ns.Exec(t, "ip", "addr", "add", p.podIP+"/24", "dev", "eth0")
	p.ns.Exec(t, "ip", "link", "set", "eth0", "up")
	ip("link", "add", p.ifb, "type", "ifb")
	ip("link", "set", p.ifb, "up")
	tcn("qdisc", "add", "dev", p.hostVeth, "root", "handle", "1:", "tbf", "rate", fmt.Sprint(inBits)+"bit",
		"burst", fmt.Sprint(p.inBurst), "limit", fmt.Sprint(p.inLimit))
	tcn("qdisc", "add", "dev", p.hostVeth, "handle", "ffff:", "ingress")
	tcn("filter", "add", "dev", p.hostVeth, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
		"action", "mirred", "egress", "redirect", "dev", p.ifb)
	tcn("qdisc", "add", "dev", p.ifb, "root", "handle", "1:", "tbf", "rate", fmt.Sprint(outBits)+"bit",
		"burst", "12500", "limit", "125000")
	p.rec = &state.Record{
		Network: "qnet", ContainerID: testnet.Unique("cid"), IfName: "eth0", Netns: p.ns.Path,
		Pod:  state.Pod{Namespace: "team-a", Name: testnet.Unique("web-"), UID: "u1"},
		Mode: state.ModeStandalone, HostVeth: p.hostVeth, IPs: []string{p.podIP + "/24"},
		Shaping: &state.Shaping{
			Ingress: &state.Direction{Device: p.hostVeth, RateBits: inBits, BurstBits: p.inBurst * 8, LimitBytes: p.inLimit, MaxQueueDelayNs: 100e6, Source: "annotation"},
			Egress:  &state.Direction{Device: p.ifb, RateBits: outBits, BurstBits: 12500 * 8, LimitBytes: 125000, MaxQueueDelayNs: 50e6, Source: "annotation"},
			IFB:     p.ifb,
		},
		Ports:   []state.Port{{HostPort: 8080, ContainerPort: 80, Protocol: "tcp", PodIP: p.podIP}, {HostPort: 8443, ContainerPort: 443, Protocol: "tcp", PodIP: p.podIP}},
		Created: time.Now(),
	}
	if err := state.New(node.StateDir).Save(p.rec); err != nil {
		t.Fatal(err)
	}
	return p
}

// push sends n bytes over TCP from the node namespace to the pod (toPod) or
// from the pod to the node, and returns when the receiver has them all.
func push(t *testing.T, node *testnet.Node, p *shapedPod, n int, toPod bool) {
	t.Helper()
	if toPod {
		transfer(t, p.ns.Path, p.podIP, node.Path, n)
	} else {
		transfer(t, node.Path, p.nodeIP, p.ns.Path, n)
	}
}

// transfer sends n bytes over TCP from a client in namespace cliNS to a
// server on srvIP in srvNS, and returns when the server has them all.
func transfer(t *testing.T, srvNS, srvIP, cliNS string, n int) {
	t.Helper()
	var ln net.Listener
	if err := inNetns(srvNS, func() (err error) { ln, err = net.Listen("tcp", srvIP+":0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		m, _ := io.Copy(io.Discard, c)
		got <- m
	}()
	var c net.Conn
	if err := inNetns(cliNS, func() (err error) { c, err = net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second); return err }); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case m := <-got:
		if m != int64(n) {
			t.Fatalf("receiver got %d bytes, want %d", m, n)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("transfer timed out")
	}
}

type scrape struct {
	text string
	fams map[string]*dto.MetricFamily
}

func scrapeAgent(t *testing.T, addr string) scrape {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics: %s\n%s", resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse scrape: %v", err)
	}
	return scrape{text: string(body), fams: fams}
}

// value returns the sample of name whose labels include want, or ok=false.
func (s scrape) value(name string, want map[string]string) (float64, bool) {
	f := s.fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

func (s scrape) must(t *testing.T, name string, want map[string]string) float64 {
	t.Helper()
	v, ok := s.value(name, want)
	if !ok {
		t.Fatalf("no %s%v in scrape:\n%s", name, want, s.text)
	}
	return v
}

func startAgent(t *testing.T, node *testnet.Node, confDir string) *Server {
	t.Helper()
	return startAgentWith(t, node, Config{CNIConfDir: confDir})
}

// startAgentWith starts the agent of node with cfg's other settings.
func startAgentWith(t *testing.T, node *testnet.Node, cfg Config) *Server {
	t.Helper()
	cfg.Listen, cfg.StateDir, cfg.JournalDir = "127.0.0.1:0", node.StateDir, journal.DirFor(node.StateDir)
	cfg.NetnsPath, cfg.Version, cfg.Logger = node.Path, "test", slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	return srv
}

func writeConflist(t *testing.T, dir, ipamDir string) string {
	t.Helper()
	conf := filepath.Join(dir, "net.d")
	if err := os.MkdirAll(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	data := `{"cniVersion":"1.0.0","name":"qnet","plugins":[{"type":"qoscni","ipam":{"type":"qoscni","dataDir":"` + ipamDir +
		`","ranges":[[{"subnet":"10.77.0.0/24"}]]}},{"type":"portmap"}]}`
	if err := os.WriteFile(filepath.Join(conf, "10-qnet.conflist"), []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return conf
}

func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := name + " not found (apt-get install prometheus, or make deps)"
	if os.Getenv(testnet.RequireRootEnv) != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

func TestAgentKernelShapedPod(t *testing.T) {
	node := testnet.NewNode(t)
	pod := newShapedPod(t, node, 1, 10_000_000, 20_000_000)
	// The pod asked for a 500 MB bucket into it; the ceiling gave 16 MiB.
	pod.rec.Shaping.Ingress.Clamped = []state.Clamp{{Setting: "burst", Requested: 500_000_000, Applied: 16 << 20}}
	if err := state.New(node.StateDir).Save(pod.rec); err != nil {
		t.Fatal(err)
	}
	srv := startAgent(t, node, writeConflist(t, node.Dir, node.IPAMDir))
	id := map[string]string{"namespace": "team-a", "pod": pod.rec.Pod.Name, "interface": "eth0"}
	in := map[string]string{"namespace": "team-a", "pod": pod.rec.Pod.Name, "interface": "eth0", "direction": "ingress"}
	out := map[string]string{"namespace": "team-a", "pod": pod.rec.Pod.Name, "interface": "eth0", "direction": "egress"}

	// Plugin calls recorded while the agent is running (and before).
	jdir := journal.DirFor(node.StateDir)
	for i, code := range []int{0, 0, 7} {
		if err := journal.Append(jdir, journal.Record{Time: time.Now(), Command: "ADD", Network: "qnet", Code: code, Duration: time.Duration(i+1) * time.Millisecond}); err != nil {
			t.Fatal(err)
		}
	}

	s0 := scrapeAgent(t, srv.Addr())
	in0, out0 := s0.must(t, "qoscni_shaping_sent_bytes_total", in), s0.must(t, "qoscni_shaping_sent_bytes_total", out)

	const toPod, fromPod = 1 << 20, 512 << 10
	t0 := time.Now()
	push(t, node, pod, toPod, true)
	took := time.Since(t0)
	push(t, node, pod, fromPod, false)
	s1 := scrapeAgent(t, srv.Addr())

	// The limit gauge is the annotation (bit/s) in bytes/s.
	if v := s1.must(t, "qoscni_shaping_rate_limit_bytes_per_second", in); v != 10_000_000/8 {
		t.Errorf("ingress limit = %v, want %v", v, 10_000_000/8)
	}
	if v := s1.must(t, "qoscni_shaping_rate_limit_bytes_per_second", out); v != 20_000_000/8 {
		t.Errorf("egress limit = %v, want %v", v, 20_000_000/8)
	}
	if v := s1.must(t, "qoscni_shaping_queue_delay_budget_seconds", in); v != 0.1 {
		t.Errorf("delay budget = %v", v)
	}
	if v := s1.must(t, "qoscni_shaping_clamped_requested", map[string]string{"pod": pod.rec.Pod.Name, "direction": "ingress", "setting": "burst"}); v != 500_000_000 {
		t.Errorf("clamped burst = %v, want the 500 MB the pod asked for", v)
	}
	if _, ok := s1.value("qoscni_shaping_clamped_requested", out); ok {
		t.Error("a clamp series for egress, which nothing clamped")
	}
	// Bytes counted at layer 2: payload plus headers (~5% at MTU 1500),
	// plus the other flow's ACKs; never less than the payload.
	for _, c := range []struct {
		name   string
		labels map[string]string
		before float64
		sent   int
	}{{"ingress", in, in0, toPod}, {"egress", out, out0, fromPod}} {
		d := s1.must(t, "qoscni_shaping_sent_bytes_total", c.labels) - c.before
		if d < float64(c.sent) || d > float64(c.sent)*1.15+64<<10 {
			t.Errorf("%s bytes grew by %.0f, want about %d", c.name, d, c.sent)
		}
		t.Logf("%s: sent %d payload bytes, counter grew by %.0f (%.3fx)", c.name, c.sent, d, d/float64(c.sent))
	}
	// 1 MiB at 10 Mbit/s cannot take much less than 0.8 s: the shaper is live.
	if min := time.Duration(float64(toPod*8) / 10e6 * 0.8 * float64(time.Second)); took < min {
		t.Errorf("1 MiB into the pod took %v, faster than the 10 Mbit/s limit allows (%v)", took, min)
	}
	if v := s1.must(t, "qoscni_shaping_overlimits_total", in); v == 0 {
		t.Error("no overlimits on a saturated shaper")
	}
	if v := s1.must(t, "qoscni_pod_hostports", map[string]string{"namespace": "team-a", "pod": pod.rec.Pod.Name}); v != 2 {
		t.Errorf("hostports = %v, want 2", v)
	}
	s1.must(t, "qoscni_attachment_info", map[string]string{"container_id": pod.rec.ContainerID, "ifb": pod.ifb})
	if v := s1.must(t, "qoscni_ipam_addresses_capacity", map[string]string{"network": "qnet"}); v != 253 {
		t.Errorf("ipam capacity = %v, want 253", v)
	}
	s1.must(t, "qoscni_ipam_addresses_used", map[string]string{"network": "qnet", "subnets": "10.77.0.0/24"})
	if v := s1.must(t, "qoscni_cni_operations_total", map[string]string{"command": "ADD", "result": "success"}); v != 2 {
		t.Errorf("ADD successes = %v, want 2", v)
	}
	if v := s1.must(t, "qoscni_cni_operations_total", map[string]string{"command": "ADD", "result": "error", "code": "7"}); v != 1 {
		t.Errorf("ADD errors = %v, want 1", v)
	}
	if v := s1.must(t, "qoscni_cni_operation_duration_seconds", map[string]string{"command": "ADD", "result": "success"}); v != 2 {
		t.Errorf("ADD duration samples = %v, want 2", v)
	}
	s1.must(t, "qoscni_build_info", map[string]string{"version": "test"})

	// promtool lints a real scrape.
	promtool := requireTool(t, "promtool")
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(s1.text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// A qdisc deleted and recreated resets the kernel counters; the exported
	// counter does not go backwards while the attachment lives.
	before := s1.must(t, "qoscni_shaping_sent_bytes_total", in)
	testnet.Run(t, "tc", "-n", node.Name, "qdisc", "del", "dev", pod.hostVeth, "root")
	testnet.Run(t, "tc", "-n", node.Name, "qdisc", "add", "dev", pod.hostVeth, "root", "handle", "2:", "tbf", "rate", "10mbit", "burst", "12500", "limit", "125000")
	push(t, node, pod, 64<<10, true)
	s2 := scrapeAgent(t, srv.Addr())
	if after := s2.must(t, "qoscni_shaping_sent_bytes_total", in); after < before+64<<10 {
		t.Errorf("counter after qdisc reset = %.0f, want >= %.0f + 64KiB", after, before)
	}
	// Journal records were consumed once.
	if v := s2.must(t, "qoscni_cni_operations_total", map[string]string{"command": "ADD", "result": "success"}); v != 2 {
		t.Errorf("ADD successes after second scrape = %v, want 2", v)
	}

	// The status table sees both directions, the limit and the hostPorts.
	rows, err := Status(cniconf.StateSources{Own: node.StateDir}, node.Path, 200*time.Millisecond)
	if err != nil || len(rows) != 2 || rows[0].Direction != "egress" || rows[1].LimitBits != 10_000_000 ||
		len(rows[1].HostPorts) != 2 || !rows[1].QdiscFound {
		t.Errorf("Status = %+v, %v", rows, err)
	}
	var table strings.Builder
	if err := WriteStatus(&table, rows, false); err != nil || !strings.Contains(table.String(), "team-a/"+pod.rec.Pod.Name) {
		t.Errorf("status table:\n%s (%v)", table.String(), err)
	}
	t.Logf("status:\n%s", table.String())

	// The pod disappears: its series go at the next scrape.
	if err := state.New(node.StateDir).Delete(pod.rec.Key()); err != nil {
		t.Fatal(err)
	}
	s3 := scrapeAgent(t, srv.Addr())
	for _, name := range []string{"qoscni_shaping_sent_bytes_total", "qoscni_shaping_rate_limit_bytes_per_second", "qoscni_attachment_info"} {
		if _, ok := s3.value(name, id); ok {
			t.Errorf("%s still exported after the pod went away", name)
		}
	}

	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + srv.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("%s: %s", path, resp.Status)
		}
	}
}
