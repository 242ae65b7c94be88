package shaping

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/testnet"
)

// kernelSetup gives a node netns with a veth whose peer sits in a pod netns,
// and a Shaper bound to the node.
func kernelSetup(t *testing.T) (*testnet.Node, *testnet.NS, *Shaper) {
	t.Helper()
	n := testnet.NewNode(t)
	pod := n.NewPod(t)
	n.Exec(t, "ip", "link", "add", "qvtest0", "type", "veth", "peer", "name", "eth0", "netns", pod.Name)
	n.Exec(t, "ip", "addr", "add", "10.66.0.1/24", "dev", "qvtest0")
	n.Exec(t, "ip", "link", "set", "qvtest0", "up")
	pod.Exec(t, "ip", "addr", "add", "10.66.0.2/24", "dev", "eth0")
	pod.Exec(t, "ip", "link", "set", "eth0", "up")
	s, err := OpenNetns(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return n, pod, s
}

func desired(in, eg *Params) Desired {
	return Desired{HostVeth: "qvtest0", IFB: "qitest0", MTU: 1500, Plan: Plan{Ingress: in, Egress: eg}}
}

func TestApplyDiffRemove(t *testing.T) {
	n, _, s := kernelSetup(t)
	in := derive(10_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	eg := derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	d := desired(in, eg)
	if diff, err := s.Diff(d); err != nil || len(diff) == 0 {
		t.Fatalf("Diff before Apply: %v %v", diff, err)
	}
	if err := s.ApplyFresh(d); err != nil {
		t.Fatal(err)
	}
	if diff, err := s.Diff(d); err != nil || len(diff) != 0 {
		t.Fatalf("Diff after Apply: %v %v", diff, err)
	}
	q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0")
	if !strings.Contains(q, "qdisc tbf 1: root") || !strings.Contains(q, "rate 10Mbit") || !strings.Contains(q, "clsact") {
		t.Errorf("veth qdiscs: %s", q)
	}
	q = n.Exec(t, "tc", "qdisc", "show", "dev", "qitest0")
	if !strings.Contains(q, "qdisc tbf 1: root") || !strings.Contains(q, "rate 20Mbit") {
		t.Errorf("ifb qdiscs: %s", q)
	}
	f := n.Exec(t, "tc", "filter", "show", "dev", "qvtest0", "ingress")
	if !strings.Contains(f, "Redirect to device qitest0") {
		t.Errorf("redirect filter: %s", f)
	}
	if l := n.Exec(t, "ip", "-o", "link", "show", "qitest0"); !strings.Contains(l, "mtu 1500") || !strings.Contains(l, "UP") {
		t.Errorf("ifb link: %s", l)
	}

	// Change the ingress rate in place; drop egress.
	in2 := derive(5_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	changes, err := s.Apply(desired(in2, nil))
	if err != nil {
		t.Fatal(err)
	}
	if len(changes) != 3 {
		t.Errorf("changes: %q", changes)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); !strings.Contains(q, "rate 5Mbit") || strings.Contains(q, "clsact") {
		t.Errorf("after reshape: %s", q)
	}
	if _, err := n.Try("ip", "link", "show", "qitest0"); err == nil {
		t.Error("IFB survived removing egress shaping")
	}
	if changes, err := s.Apply(desired(in2, nil)); err != nil || len(changes) != 0 {
		t.Errorf("second Apply changed %q (%v)", changes, err)
	}

	// Drift: someone deletes the root qdisc; Diff sees it, Apply restores.
	n.Exec(t, "tc", "qdisc", "del", "dev", "qvtest0", "root")
	if diff, _ := s.Diff(desired(in2, nil)); len(diff) != 1 {
		t.Errorf("drift not seen: %q", diff)
	}
	if _, err := s.Apply(desired(in2, nil)); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); strings.Contains(q, "tbf") {
		t.Errorf("after Remove: %s", q)
	}
}

func TestHTBAboveTBFRange(t *testing.T) {
	n, _, s := kernelSetup(t)
	// 100 Gbit/s is above TBF's 32-bit byte rate; 1 Pbit/s is the top.
	for _, rate := range []uint64{100_000_000_000, MaxRateBits} {
		p := derive(rate, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
		if _, err := s.Apply(desired(p, p)); err != nil {
			t.Fatalf("rate %d: %v", rate, err)
		}
		if diff, err := s.Diff(desired(p, p)); err != nil || len(diff) != 0 {
			t.Fatalf("rate %d: Diff after Apply: %q %v", rate, diff, err)
		}
		c := n.Exec(t, "tc", "class", "show", "dev", "qvtest0")
		if !strings.Contains(c, "htb 1:1") {
			t.Errorf("class: %s", c)
		}
	}
	// Back down to TBF: the kind changes.
	p := derive(1_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	if _, err := s.Apply(desired(p, nil)); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); !strings.Contains(q, "tbf 1: root") || !strings.Contains(q, "rate 1Mbit") {
		t.Errorf("back to tbf: %s", q)
	}
	if s.HasFqCodel() {
		t.Log("this kernel has fq_codel: the leaf is fq_codel")
	} else {
		t.Log("no fq_codel in this kernel: byte FIFO leaf (fallback path)")
	}
}

func TestForeignRootQdiscUntouched(t *testing.T) {
	n, _, s := kernelSetup(t)
	n.Exec(t, "tc", "qdisc", "add", "dev", "qvtest0", "root", "handle", "5:", "pfifo", "limit", "100")
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); !strings.Contains(q, "pfifo 5:") {
		t.Errorf("Remove deleted a qdisc that is not ours: %s", q)
	}
}

// A qdisc anywhere on the node that go-tc v0.4.4 cannot decode (a TBF
// above 2^32 bytes/s, which the kernel dumps with TCA_TBF_RATE64) failed
// every qdisc dump, so every ADD, CHECK and DEL. Shaping reads past it and
// leaves it alone.
func TestUndecodableForeignQdiscDoesNotStopShaping(t *testing.T) {
	n, _, s := kernelSetup(t)
	n.Exec(t, "ip", "link", "add", "qvfast0", "type", "veth", "peer", "name", "qvfast1")
	n.Exec(t, "tc", "qdisc", "add", "dev", "qvfast0", "root", "handle", "7:", "tbf", "rate", "40gbit", "burst", "64kb", "limit", "1mb")
	d := desired(derive(10_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation),
		derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation))
	if err := s.ApplyFresh(d); err != nil {
		t.Fatal(err)
	}
	if diff, err := s.Diff(d); err != nil || len(diff) != 0 {
		t.Fatalf("Diff after Apply: %v %v", diff, err)
	}
	if err := s.BeginPass(); err != nil {
		t.Fatalf("a pass's dump: %v", err)
	}
	s.EndPass()
	if err := s.Remove("qvtest0", "qitest0"); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); strings.Contains(q, "tbf 1:") || strings.Contains(q, "clsact") {
		t.Errorf("Remove left shaping behind: %s", q)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvfast0"); !strings.Contains(q, "tbf 7: root") || !strings.Contains(q, "40Gbit") {
		t.Errorf("the other device's TBF changed: %s", q)
	}
}

// A running TCP flow keeps its connection while the rate changes under it,
// and converges to the new rate.
func TestReshapeInPlaceWithFlow(t *testing.T) {
	n, pod, s := kernelSetup(t)
	testnet.StartIperf3(t, pod)
	p := derive(20_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	if err := s.ApplyFresh(desired(p, nil)); err != nil {
		t.Fatal(err)
	}
	type interval struct {
		Sum struct {
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum"`
	}
	var res struct {
		Intervals []interval `json:"intervals"`
		Error     string     `json:"error"`
	}
	done := make(chan error, 1)
	var out []byte
	go func() {
		var err error
		out, err = exec.Command("ip", "netns", "exec", n.Name, "iperf3", "-c", "10.66.0.2", "-t", "6", "-i", "1", "-J").Output()
		done <- err
	}()
	time.Sleep(2500 * time.Millisecond)
	p2 := derive(5_000_000, 0, false, 10*time.Millisecond, 1500, SourceAnnotation)
	changes, err := s.Apply(desired(p2, nil))
	if err != nil || len(changes) != 1 {
		t.Fatalf("reshape: %q %v", changes, err)
	}
	time.Sleep(time.Second)
	t.Logf("after reshape:\n%s", n.Exec(t, "tc", "-s", "qdisc", "show", "dev", "qvtest0"))
	if err := <-done; err != nil {
		t.Fatalf("flow broke during reshape: %v %s", err, out)
	}
	if err := json.Unmarshal(out, &res); err != nil || res.Error != "" || len(res.Intervals) < 6 {
		t.Fatalf("iperf3: %v %q (%d intervals)", err, res.Error, len(res.Intervals))
	}
	first := res.Intervals[1].Sum.BitsPerSecond
	last := res.Intervals[len(res.Intervals)-1].Sum.BitsPerSecond
	t.Logf("before %.2f Mbit/s, after %.2f Mbit/s", first/1e6, last/1e6)
	if first < 14e6 || last > 6.5e6 || last < 3e6 {
		t.Errorf("rate did not follow the reshape: %.2f then %.2f Mbit/s", first/1e6, last/1e6)
	}
}

// A pod's own peak rate and minburst reach TBF, CHECK sees a peak changed
// by hand, and a rate with a long queue (no peak of qoscni's own) gets
// the pod's peak too; the peak rate holds a flow to it over the first
// burst.
func TestPodPeakRate(t *testing.T) {
	n, pod, s := kernelSetup(t)
	plan, err := Resolve(Inputs{Annotations: map[string]string{
		AnnotationIngressRate: "20M", AnnotationIngressBurst: "8M", AnnotationIngressPeakRate: "40M", AnnotationIngressMinBurst: "3028",
		CalicoEgressBandwidth: "500M", CalicoEgressPeakrate: "800M"}}, 1500)
	if err != nil {
		t.Fatal(err)
	}
	d := desired(plan.Ingress, plan.Egress)
	if err := s.ApplyFresh(d); err != nil {
		t.Fatal(err)
	}
	if diff, err := s.Diff(d); err != nil || len(diff) != 0 {
		t.Fatalf("Diff after Apply: %q %v", diff, err)
	}
	// tc prints the minburst back from the kernel's ticks (3028 B shows
	// as about 3025).
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); !strings.Contains(q, "peakrate 40Mbit") || !strings.Contains(q, "minburst 30") {
		t.Errorf("veth: %s", q)
	}
	// 500M has a queue of its own above 128 KiB: qoscni would use no peak;
	// the pod's is there, over one frame.
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qitest0"); !strings.Contains(q, "peakrate 800Mbit") || !strings.Contains(q, "minburst 15") {
		t.Errorf("ifb: %s", q)
	}
	// A peak changed by hand is drift.
	n.Exec(t, "tc", "qdisc", "change", "dev", "qvtest0", "root", "handle", "1:", "tbf", "rate", "20mbit", "burst", "1000000", "limit", "65536",
		"peakrate", "60mbit", "minburst", "3028")
	if diff, _ := s.Diff(d); len(diff) != 1 {
		t.Errorf("changed peak not seen: %q", diff)
	}
	if _, err := s.Apply(d); err != nil {
		t.Fatal(err)
	}
	if q := n.Exec(t, "tc", "qdisc", "show", "dev", "qvtest0"); !strings.Contains(q, "peakrate 40Mbit") {
		t.Errorf("peak not restored: %s", q)
	}
	// Traffic into the pod, in 100 ms intervals: the 8 Mbit bucket lets
	// the flow run above its 20M rate at first, but never above the 40M
	// peak (without a peak the bucket drains at the speed of the veth);
	// then the 20M rate.
	// Measured where it arrives: the pod's client receives (-R).
	testnet.StartIperf3(t, n.NS)
	out := pod.Exec(t, "iperf3", "-c", "10.66.0.1", "-t", "3", "-i", "0.1", "-R", "-J")
	var r struct {
		Intervals []struct {
			Sum struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum"`
		} `json:"intervals"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || len(r.Intervals) < 20 {
		t.Fatalf("iperf3: %v %s", err, out)
	}
	// The highest 200 ms (two intervals): a receiver the loaded machine
	// does not schedule for a moment moves data from one 100 ms interval
	// into the next, not out of a pair.
	top, tail := 0.0, 0.0
	for i, iv := range r.Intervals {
		if i > 0 {
			top = max(top, (iv.Sum.BitsPerSecond+r.Intervals[i-1].Sum.BitsPerSecond)/2)
		}
		if i >= len(r.Intervals)-10 {
			tail += iv.Sum.BitsPerSecond / 10
		}
	}
	t.Logf("highest 200 ms %.1f Mbit/s, last second %.1f Mbit/s", top/1e6, tail/1e6)
	// Without the peak the 1 MB bucket would put about 60 Mbit/s into
	// the first 200 ms (8 Mbit of bucket, then the rate); 1.3x the peak
	// leaves room for the receiver's scheduling.
	if top > 1.3*40e6 || top < 1.2*20e6 {
		t.Errorf("highest 200 ms at %.1f Mbit/s: want above the 20M rate (the bucket) and near the 40M peak", top/1e6)
	}
	if tail > 1.05*20e6 || tail < 0.8*20e6 {
		t.Errorf("last second %.1f Mbit/s, want the 20M rate", tail/1e6)
	}
}
