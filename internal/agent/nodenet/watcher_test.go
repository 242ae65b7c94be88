package nodenet

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// recordingSink stands for ipMasq: it records each pass's CIDRs and time.
type recordingSink struct {
	mu     sync.Mutex
	passes []sinkPass
}

type sinkPass struct {
	at    time.Time
	cidrs int
}

func (s *recordingSink) SetClusterCIDRs(nets []net.IPNet) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.passes = append(s.passes, sinkPass{time.Now(), len(nets)})
	return nil
}

func (s *recordingSink) snapshot() []sinkPass {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sinkPass(nil), s.passes...)
}

func (s *recordingSink) waitFor(t *testing.T, cidrs int, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for _, p := range s.snapshot() {
			if p.cidrs == cidrs {
				return p.at
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("no pass with %d CIDRs within %v; passes %v", cidrs, timeout, s.snapshot())
	return time.Time{}
}

func simpleNode(i int) *corev1.Node {
	return node(fmt.Sprintf("n%d", i), []string{fmt.Sprintf("10.%d.%d.0/24", i/256, i%256)}, internal(fmt.Sprintf("192.168.%d.%d", i/256, i%256)))
}

func startWatcher(t *testing.T, client *fake.Clientset, sink ClusterCIDRSink, resync time.Duration) {
	t.Helper()
	w, err := NewWatcher(WatcherConfig{Client: client, NodeName: "n0", Masq: sink, Resync: resync,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// Events are coalesced: passes at least MinInterval apart, a burst costs
// a few passes, a single event is served promptly, and changes that do
// not touch routing cost nothing.
func TestWatcherCoalesces(t *testing.T) {
	client := fake.NewClientset(simpleNode(0))
	sink := &recordingSink{}
	startWatcher(t, client, sink, time.Hour)
	sink.waitFor(t, 1, 5*time.Second) // the pass after the first list

	ctx := context.Background()
	const burst = 100
	start := time.Now()
	for i := 1; i <= burst; i++ {
		if _, err := client.CoreV1().Nodes().Create(ctx, simpleNode(i), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	created := time.Since(start)
	sink.waitFor(t, burst+1, 5*time.Second)
	time.Sleep(300 * time.Millisecond)
	passes := sink.snapshot()[1:]
	t.Logf("%d creations in %v -> %d passes", burst, created.Round(time.Millisecond), len(passes))
	for i := 1; i < len(passes); i++ {
		// Passes are spaced by their start; the sink sees them after
		// the listing, whose time varies on a busy machine.
		if gap := passes[i].at.Sub(passes[i-1].at); gap < DefaultMinInterval*3/4 {
			t.Errorf("passes %d and %d only %v apart", i-1, i, gap)
		}
	}
	if max := int(created/DefaultMinInterval) + 3; len(passes) > max {
		t.Errorf("%d passes for a burst over %v, want <= %d", len(passes), created, max)
	}

	// One node after a quiet time: served at once.
	time.Sleep(2 * DefaultMinInterval)
	at := time.Now()
	if _, err := client.CoreV1().Nodes().Create(ctx, simpleNode(burst+1), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	lat := sink.waitFor(t, burst+2, 5*time.Second).Sub(at)
	t.Logf("single event to pass: %v", lat)
	if lat > 2*DefaultMinInterval {
		t.Errorf("single event served after %v, want <= %v", lat, 2*DefaultMinInterval)
	}

	// A status update routing does not read (a heartbeat) causes no pass.
	n := simpleNode(3)
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
	before := len(sink.snapshot())
	if _, err := client.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * DefaultMinInterval)
	if after := len(sink.snapshot()); after != before {
		t.Errorf("a heartbeat caused %d passes", after-before)
	}
	// Deleting a node does.
	if err := client.CoreV1().Nodes().Delete(ctx, "n3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, burst+1, 5*time.Second)
}

// Without events, passes come at the resync period (drift repair).
func TestWatcherResync(t *testing.T) {
	client := fake.NewClientset(simpleNode(0), simpleNode(1))
	sink := &recordingSink{}
	startWatcher(t, client, sink, 150*time.Millisecond)
	time.Sleep(time.Second)
	if n := len(sink.snapshot()); n < 4 || n > 8 {
		t.Errorf("%d passes in 1 s at a 150 ms resync", n)
	}
}

func TestNewWatcherChecks(t *testing.T) {
	client := fake.NewClientset()
	for _, cfg := range []WatcherConfig{
		{NodeName: "a", Masq: &recordingSink{}},
		{Client: client, Masq: &recordingSink{}},
		{Client: client, NodeName: "a"},
	} {
		if _, err := NewWatcher(cfg); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
}

func TestSlimNode(t *testing.T) {
	n := node("a", []string{"10.1.0.0/24"}, internal("192.168.0.1"),
		corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: "203.0.113.1"})
	n.Status.Images = []corev1.ContainerImage{{Names: []string{"big"}}}
	n.Labels = map[string]string{"x": "y"}
	obj, err := slimNode(n)
	if err != nil {
		t.Fatal(err)
	}
	s := obj.(*corev1.Node)
	if len(s.Status.Images) != 0 || s.Labels != nil || len(s.Status.Addresses) != 1 {
		t.Errorf("not slim: %+v", s)
	}
	if !PeerFromNode(s).Equal(PeerFromNode(n)) {
		t.Error("slimming changed the peer")
	}
}
