package k8s_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/qoscni/qoscni/internal/agent/install"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/shaping"
)

// guaranteeCapacity is the node capacity the step configures, each way.
const guaranteeCapacity = 100e6

// guaranteesStep turns guaranteed bandwidth on the way an operator does
// (the ConfigMap's nodeCapacity, a rollout of the DaemonSet), then: a pod
// requesting 60 % of the capacity keeps its request against a best-effort
// pod saturating the same direction; a request that no longer fits is
// refused at sandbox creation with the CNI error naming the capacity.
func (e *env) guaranteesStep(t *testing.T) {
	e.setNodeCapacity(t, "100M")
	waitFor(t, 30*time.Second, "conflist with nodeCapacity", func() error {
		b, err := os.ReadFile(filepath.Join(install.CNIConfDir, install.ConflistName))
		if err != nil || !strings.Contains(string(b), `"nodeCapacity"`) {
			return fmt.Errorf("%v %s", err, b)
		}
		return nil
	})

	req := func(bits string) map[string]string {
		return map[string]string{shaping.AnnotationIngressRequest: bits, shaping.AnnotationEgressRequest: bits}
	}
	e.createDeployment(t, deployment("gold", req("60M"), nil))
	e.createDeployment(t, deployment("bronze", nil, nil))
	_, gold := e.runningPod(t, "gold")
	_, bronze := e.runningPod(t, "bronze")
	if gold.Shaping == nil || gold.Shaping.Guarantee == nil || gold.Shaping.Guarantee.Ingress.RequestBits != 60e6 {
		t.Fatalf("gold's record: %+v", gold.Shaping)
	}
	testnet.StartIperf3(t, podNS(t, gold))
	testnet.StartIperf3(t, podNS(t, bronze))

	t.Run("request-kept-under-contention", func(t *testing.T) {
		// Both saturate traffic into their pods, sent from the node.
		got := e.concurrentIperf3(t, []string{podIPv4(t, gold), podIPv4(t, bronze)}, 5, false)
		t.Logf("into pods, capacity %.0f Mbit/s: gold (request 60M) %.1f, bronze (none) %.1f, total %.1f Mbit/s",
			guaranteeCapacity/1e6, got[0]/1e6, got[1]/1e6, (got[0]+got[1])/1e6)
		if got[0] < 0.9*60e6 {
			t.Errorf("gold got %.1f Mbit/s, under 0.9 of its 60M request", got[0]/1e6)
		}
		if total := got[0] + got[1]; total < 0.85*guaranteeCapacity || total > 1.05*guaranteeCapacity {
			t.Errorf("total %.1f Mbit/s, want 0.85-1.05 of the capacity", total/1e6)
		}
	})
	t.Run("over-capacity-refused", func(t *testing.T) {
		e.createDeployment(t, deployment("platinum", req("50M"), nil))
		waitFor(t, 60*time.Second, "platinum's sandbox refused with the capacity in the event", func() error {
			evs, err := e.cp.Client.CoreV1().Events("default").List(ctx(t), metav1.ListOptions{})
			if err != nil {
				return err
			}
			for _, ev := range evs.Items {
				if strings.HasPrefix(ev.InvolvedObject.Name, "platinum-") && strings.Contains(ev.Message, "node capacity 100Mbit/s") &&
					strings.Contains(ev.Message, "60Mbit/s already reserved") && strings.Contains(ev.Message, "requests 50Mbit/s") {
					t.Logf("event %s: %s", ev.Reason, ev.Message)
					return nil
				}
			}
			return fmt.Errorf("%d events, none from the admission", len(evs.Items))
		})
		// Making room lets it start.
		if err := e.cp.Client.AppsV1().Deployments("default").Delete(ctx(t), "gold", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		e.runningPod(t, "platinum")
	})
}

// concurrentIperf3 runs one iperf3 client from the node against each
// address at once (an iperf3 server in each pod) for secs seconds and
// returns each steady rate; reverse makes the pods send.
func (e *env) concurrentIperf3(t *testing.T, addrs []string, secs int, reverse bool) []float64 {
	t.Helper()
	var wg sync.WaitGroup
	outs := make([]string, len(addrs))
	errs := make([]error, len(addrs))
	for i, a := range addrs {
		args := []string{"-c", a, "-t", strconv.Itoa(secs), "-J"}
		if reverse {
			args = append(args, "-R")
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = e.n.NetNS.Try("iperf3", args...)
		}()
	}
	wg.Wait()
	got := make([]float64, len(addrs))
	for i := range outs {
		if errs[i] != nil {
			t.Fatalf("iperf3 -c %s: %v %s", addrs[i], errs[i], outs[i])
		}
		got[i] = parseIperf3(t, []byte(outs[i])).steady
	}
	return got
}
