// Command reshape measures live reshaping: the time from a pod annotation
// change (an Update through a fake clientset, seen by the agent's pod
// informer) to the new rate being in the kernel, over many changes on a
// node with many shaped pods; plus the cost of the periodic reconcile pass
// and the agent's CPU while nothing changes. Pods are made by the real
// plugin binary (ADD in a fresh node namespace); the reconciler and
// informer run in this process, as in the agent. Needs root; run via
// test/bench/reshape.sh.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/qoscni/qoscni/internal/agent/kube"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

const node = "bench-node"

func main() {
	plugin := flag.String("plugin", "bin/qoscni", "plugin binary")
	pods := flag.Int("pods", 100, "shaped pods on the node")
	changes := flag.Int("changes", 100, "annotation changes to time")
	idle := flag.Duration("idle", 10*time.Second, "idle window for the CPU measurement")
	passes := flag.Int("passes", 10, "timed full reconcile passes")
	flag.Parse()
	if err := run(*plugin, *pods, *changes, *passes, *idle); err != nil {
		fmt.Fprintln(os.Stderr, "test/bench/reshape:", err)
		os.Exit(1)
	}
}

func sh(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %v\n%s", name, args, err, out)
	}
	return nil
}

type handler struct{ r *reconcile.Reconciler }

func (h *handler) PodChanged(ns, name string) { h.r.PodChanged(ns, name) }

func run(plugin string, nPods, nChanges, nPasses int, idle time.Duration) error {
	plugin, err := filepath.Abs(plugin)
	if err != nil {
		return err
	}
	tag := fmt.Sprintf("%d", os.Getpid())
	nodeNS := "qbrs" + tag
	if err := sh("ip", "netns", "add", nodeNS); err != nil {
		return err
	}
	var podNS []string
	defer func() {
		for _, p := range podNS {
			_ = exec.Command("ip", "netns", "del", p).Run()
		}
		_ = exec.Command("ip", "netns", "del", nodeNS).Run()
	}()
	dir, err := os.MkdirTemp("", "qoscni-bench-reshape-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	stateDir := filepath.Join(dir, "state")
	conf := map[string]any{
		"cniVersion": "1.1.0", "name": "qbench", "type": "qoscni", "bridge": "qbr0",
		"isDefaultGateway": true, "stateDir": stateDir,
		"capabilities": map[string]any{"bandwidth": true, "io.kubernetes.cri.pod-annotations": true},
		"ipam": map[string]any{
			"ranges":  []any{[]any{map[string]any{"subnet": "10.90.0.0/20"}}},
			"dataDir": filepath.Join(dir, "ipam"),
		},
	}
	client := fake.NewClientset()
	ann := func(in, out string) map[string]string {
		return map[string]string{shaping.AnnotationIngressRate: in, shaping.AnnotationEgressRate: out}
	}
	setup := time.Now()
	for i := 0; i < nPods; i++ {
		name := fmt.Sprintf("p%03d", i)
		ns := "qbrp" + tag + "-" + name
		if err := sh("ip", "netns", "add", ns); err != nil {
			return err
		}
		podNS = append(podNS, ns)
		a := ann("10M", "10M")
		c := map[string]any{}
		for k, v := range conf {
			c[k] = v
		}
		c["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": a}
		b, _ := json.Marshal(c)
		cmd := exec.Command("ip", "netns", "exec", nodeNS, plugin)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=ADD", "CNI_CONTAINERID=c" + name,
			"CNI_NETNS=/run/netns/" + ns, "CNI_IFNAME=eth0", "CNI_PATH=" + filepath.Dir(plugin),
			state.RegistryEnv + "=" + filepath.Join(filepath.Dir(stateDir), "statedirs"),
			"CNI_ARGS=K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + name + ";K8S_POD_UID=u" + name}
		cmd.Stdin = strings.NewReader(string(b))
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("ADD %s: %v\n%s", name, err, out)
		}
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, UID: types.UID("u" + name), Annotations: a},
			Spec: corev1.PodSpec{NodeName: node}}
		if _, err := client.CoreV1().Pods("default").Create(context.Background(), pod, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "set up %d pods in %v\n", nPods, time.Since(setup).Round(time.Millisecond))

	fd, err := unix.Open("/run/netns/"+nodeNS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var h handler
	w, err := kube.NewPodWatcher(client, node, &h, log)
	if err != nil {
		return err
	}
	r, err := reconcile.New(reconcile.Config{StateDir: stateDir, NetnsFd: fd, Pods: w, Interval: time.Hour, Logger: log})
	if err != nil {
		return err
	}
	defer r.Close()
	h.r = r
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w.Start(ctx)
	w.WaitForSync(ctx)
	done := make(chan struct{})
	go func() { _ = r.Run(ctx); close(done) }()
	defer func() { cancel(); <-done; w.Shutdown() }()

	// The checker reads the kernel through the same comparison routine,
	// from its own sockets.
	checker, err := shaping.Open(fd)
	if err != nil {
		return err
	}
	defer checker.Close()
	store := state.New(stateDir)
	recs := map[string]*state.Record{}
	all, _, err := store.List("qbench")
	if err != nil {
		return err
	}
	for _, rec := range all {
		recs[rec.Pod.Name] = rec
	}
	if len(recs) != nPods {
		return fmt.Errorf("%d records for %d pods", len(recs), nPods)
	}
	// Settle: the informer's initial adds, one full pass.
	time.Sleep(500 * time.Millisecond)
	if _, err := r.PassNow(ctx); err != nil {
		return err
	}

	var lat []time.Duration
	for i := 0; i < nChanges; i++ {
		name := fmt.Sprintf("p%03d", i%nPods)
		in := fmt.Sprintf("%dM", 11+i%7)
		rec := recs[name]
		plan, err := shaping.Resolve(shaping.Inputs{Annotations: ann(in, "10M")}, rec.MTU)
		if err != nil {
			return err
		}
		want := shaping.Desired{HostVeth: rec.HostVeth, IFB: rec.Shaping.IFB, MTU: rec.MTU, Plan: plan}
		pods := client.CoreV1().Pods("default")
		p, err := pods.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		p.Annotations = ann(in, "10M")
		start := time.Now()
		if _, err := pods.Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			return err
		}
		for {
			d, err := checker.Diff(want)
			if err != nil {
				return err
			}
			if len(d) == 0 {
				break
			}
			if time.Since(start) > 10*time.Second {
				return fmt.Errorf("change %d (%s -> %s) not applied after 10 s: %q", i, name, in, d)
			}
			time.Sleep(time.Millisecond)
		}
		lat = append(lat, time.Since(start))
		time.Sleep(20 * time.Millisecond) // changes are spread, not a burst
	}

	var passT []time.Duration
	for i := 0; i < nPasses; i++ {
		res, err := r.PassNow(ctx)
		if err != nil {
			return err
		}
		if res.Repaired != 0 || res.Reshaped != 0 || res.Errors != 0 {
			return fmt.Errorf("pass on a settled node did work: %+v", res)
		}
		passT = append(passT, res.Duration)
	}
	cpu0 := cpuTime()
	time.Sleep(idle)
	idleCPU := cpuTime() - cpu0

	cpu0 = cpuTime()
	for i := 0; i < nPasses; i++ {
		if _, err := r.PassNow(ctx); err != nil {
			return err
		}
	}
	passCPU := (cpuTime() - cpu0) / time.Duration(nPasses)

	fmt.Println("| shaped pods | changes | annotation -> kernel p50 | p99 | max | full pass p50 (wall) | full pass CPU | idle CPU (no pass) | idle CPU at 30 s interval |")
	fmt.Println("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	fmt.Printf("| %d | %d | %v | %v | %v | %v | %v | %.3f%% | %.3f%% |\n", nPods, nChanges,
		pct(lat, 50), pct(lat, 99), slices.Max(lat), pct(passT, 50), passCPU.Round(time.Microsecond),
		100*float64(idleCPU)/float64(idle), 100*float64(passCPU)/float64(30*time.Second))
	return nil
}

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(i-1, 0)].Round(10 * time.Microsecond)
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
