package reconcile_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/portmap"
)

// newRepairEnv is a node with the plugin's config and a reconciler, as the
// agent wires it, running a pass every interval: portmap's GC step and
// the nftables and localnet guard repairs. No API: pods are the plugin's.
func newRepairEnv(t *testing.T, interval time.Duration) *env {
	t.Helper()
	e, fd, log := baseEnv(t, "10.79.0.0/24")
	cfg := reconcile.Config{StateDir: e.node.StateDir, CNIConfDir: e.confDir, NetnsFd: fd, Interval: interval,
		Metrics: e.metrics, Logger: log,
		Cleaners: []reconcile.AttachmentCleaner{portmap.NewCleaner(fd)},
		Repairers: []reconcile.KernelRepairer{
			portmap.NewRepairer(fd, []string{portmap.LocalnetDir(e.node.StateDir)}, log),
			podnet.NewMasqRepairer(fd, log),
		},
	}
	r, err := reconcile.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.rec = r
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	done := make(chan struct{})
	go func() { _ = r.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		r.Close()
	})
	return e
}

// addPodWithPorts runs the plugin's ADD with runtimeConfig portMappings.
func (e *env) addPodWithPorts(name string, ports ...map[string]any) (*testnet.NS, *state.Record) {
	t := e.t
	t.Helper()
	ns := e.node.NewPod(t)
	conf := map[string]any{}
	for k, v := range e.conf {
		conf[k] = v
	}
	conf["capabilities"] = map[string]any{"portMappings": true}
	conf["runtimeConfig"] = map[string]any{"portMappings": ports}
	b, _ := json.Marshal(conf)
	cid := "c" + name
	e.node.Invoke(t, testnet.Call{Command: "ADD", ContainerID: cid, Netns: ns.Path, IfName: "eth0",
		Args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + name, Config: b}).MustSucceed(t, "ADD "+name)
	t.Cleanup(func() {
		e.node.Invoke(t, testnet.Call{Command: "DEL", ContainerID: cid, Netns: ns.Path, IfName: "eth0", Config: b})
	})
	return ns, e.record(cid)
}

// serveTCP answers every connection to port in ns with tag.
func serveTCP(t *testing.T, ns *testnet.NS, port int, tag string) {
	t.Helper()
	var l net.Listener
	if err := testnet.InNS(ns.Path, func() (err error) {
		l, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(tag))
			c.Close()
		}
	}()
}

// tcpGet connects from ns to addr and returns what the server sent.
func tcpGet(ns *testnet.NS, addr string) (string, error) {
	var out string
	err := testnet.InNS(ns.Path, func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		b, err := io.ReadAll(c)
		out = string(b)
		return err
	})
	return out, err
}

// passes is how many full passes the reconciler finished.
func (e *env) passes() uint64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "qoscni_agent_reconcile_pass_duration_seconds" {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	return 0
}

// The case: `nft flush ruleset` under a running agent. The next
// pass (within one interval) brings back the martian guard, the hostPort
// mapping and the masquerade elements, counted per kind; and a pod's
// packets to 127.0.0.1, or from a 127/8 source, never reach the node's
// loopback: not before the flush, not in the window until the repair (the
// localnet guard in tc holds it), not after.
func TestNftFlushRepairedAndLocalhostGuardedThroughout(t *testing.T) {
	const interval = time.Second
	e := newRepairEnv(t, interval)
	pod, rec := e.addPodWithPorts("web", map[string]any{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
	serveTCP(t, pod, 80, "web")
	podIP := net.ParseIP(strings.SplitN(rec.IPs[0], "/", 2)[0]).To4()
	gw := net.ParseIP(rec.Gateways[0]).To4()
	hostPort := net.JoinHostPort(gw.String(), "8080")
	if got, err := tcpGet(e.node.NS, hostPort); err != nil || got != "web" {
		t.Fatalf("hostPort %s after ADD: %q, %v", hostPort, got, err)
	}

	// A pod with CAP_NET_RAW probes the node's loopback all along.
	const port = 9999
	sink := testnet.NewUDPSink(t, e.node.NS, port)
	var mac net.HardwareAddr
	if err := testnet.InNS(e.node.Path, func() error {
		ifc, err := net.InterfaceByName(rec.Bridge)
		if err == nil {
			mac = ifc.HardwareAddr
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	sp := testnet.NewSpoofer(t, pod, "eth0", mac)
	var phase atomic.Value
	phase.Store("before")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sendErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			ph := phase.Load().(string)
			for _, p := range []struct {
				src, dst net.IP
				kind     string
			}{{podIP, net.IPv4(127, 0, 0, 1), "to127"}, {net.IPv4(127, 0, 0, 5), gw, "from127"}, {podIP, gw, "control"}} {
				if err := sp.SendUDP(p.src, p.dst, 40000, port, []byte(p.kind+"/"+ph)); err != nil && sendErr == nil {
					sendErr = err
				}
			}
		}
	}()
	stopProbes := func() {
		select {
		case <-stop:
		default:
			close(stop)
			wg.Wait()
		}
	}
	defer stopProbes()
	waitCount := func(payload string, n int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for sink.Count(payload) < n {
			if time.Now().After(deadline) {
				t.Fatalf("only %d %q probes arrived (send error: %v)", sink.Count(payload), payload, sendErr)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitCount("control/before", 20)

	// Flush right after a pass: the window lasts until the next one.
	for n := e.passes(); e.passes() == n; {
		time.Sleep(2 * time.Millisecond)
	}
	repairs0 := map[string]float64{}
	kinds := []string{portmap.RepairBase, portmap.RepairHostPort, podnet.RepairMasquerade, portmap.RepairGuard}
	for _, k := range kinds {
		repairs0[k] = e.metric("qoscni_agent_repairs_total", "kind", k)
	}
	phase.Store("window")
	e.node.Exec(t, "nft", "flush", "ruleset")
	flushed, passesAtFlush := time.Now(), e.passes()
	if _, err := e.node.Try("nft", "list", "table", "inet", "qoscni"); err == nil {
		t.Fatal("the flush left table inet qoscni")
	}
	if got, err := tcpGet(e.node.NS, hostPort); err == nil {
		t.Fatalf("hostPort answered %q right after the flush: no window to test", got)
	}

	restored := func() bool {
		out, err := e.node.Try("nft", "list", "table", "inet", "qoscni")
		if err != nil || !strings.Contains(out, "chain martian") || !strings.Contains(out, "chain masquerade") {
			return false
		}
		got, err := tcpGet(e.node.NS, hostPort)
		return err == nil && got == "web"
	}
	back := true
	for !restored() {
		if time.Since(flushed) > interval+3*time.Second {
			// Go on: what the probes met in the window matters as much.
			t.Errorf("not restored %v after the flush", time.Since(flushed))
			back = false
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	took, passesAtRestore := time.Since(flushed), e.passes()
	phase.Store("after")
	if back {
		t.Logf("restored %v after the flush (interval %v); %d probes of each kind arrived in the window", took, interval, sink.Count("control/window"))
	}
	waitCount("control/after", 20)
	stopProbes()
	time.Sleep(50 * time.Millisecond) // the last probes in flight

	if back && passesAtRestore > passesAtFlush+1 {
		t.Errorf("restored by pass %d after the flush, want the next one", passesAtRestore-passesAtFlush)
	}
	if sink.Count("control/window") == 0 {
		t.Error("no probe arrived in the window: it proves nothing")
	}
	for _, ph := range []string{"before", "window", "after"} {
		to, from := sink.Count("to127/"+ph), sink.Count("from127/"+ph)
		if to != 0 || from != 0 {
			t.Errorf("%s the flush and its repair: %d packets to 127.0.0.1 and %d from 127.0.0.5 reached the node (controls: %d)",
				map[string]string{"before": "before", "window": "between", "after": "after"}[ph], to, from, sink.Count("control/"+ph))
		}
	}
	if !back {
		return
	}

	// The elements the records call for, back in place.
	list := func(set string) string { return e.node.Exec(t, "nft", "list", "set", "inet", "qoscni", set) }
	if s := list("masq-src4"); !strings.Contains(s, podIP.String()) {
		t.Errorf("masq-src4 without %s:\n%s", podIP, s)
	}
	if s := list("masq-skip-dst4"); !strings.Contains(s, "10.79.0.0/24") || !strings.Contains(s, "224.0.0.0/4") {
		t.Errorf("masq-skip-dst4 without the pod subnet and multicast:\n%s", s)
	}
	if s := list("hairpin4"); !strings.Contains(s, podIP.String()) {
		t.Errorf("hairpin4 without %s:\n%s", podIP, s)
	}
	// nftables-base: portmap's and ipMasq's; hostport: the map element and
	// the hairpin element; masquerade: the address, its subnet, multicast
	// of both families. The tc guard was never touched.
	want := map[string]float64{portmap.RepairBase: 2, portmap.RepairHostPort: 2, podnet.RepairMasquerade: 4, portmap.RepairGuard: 0}
	for _, k := range kinds {
		if got := e.metric("qoscni_agent_repairs_total", "kind", k) - repairs0[k]; got != want[k] {
			t.Errorf("repairs_total{kind=%q} grew by %v, want %v", k, got, want[k])
		}
	}
	// Nothing left to repair on the next pass.
	for n := e.passes(); e.passes() < n+2; {
		time.Sleep(10 * time.Millisecond)
	}
	for _, k := range kinds {
		if got := e.metric("qoscni_agent_repairs_total", "kind", k) - repairs0[k]; got != want[k] {
			t.Errorf("after two more passes, repairs_total{kind=%q} grew by %v, want %v", k, got, want[k])
		}
	}
}
