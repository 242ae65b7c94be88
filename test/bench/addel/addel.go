// Package addel measures CNI ADD and DEL latency as a container runtime sees
// it: wall clock around libcni's AddNetworkList / DelNetworkList, which
// includes exec of every plugin in the chain, config parsing and result
// caching.
//
// It must run inside the network namespace that stands for the node. It makes
// its own pod namespaces (named, with a unique prefix), fills the node up to a
// population of P attachments, then times K extra ADD+DEL cycles at that
// population, and finally removes every attachment and namespace it made.
package addel

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/vishvananda/netns"
)

// netnsDir is where vishvananda/netns.NewNamed bind-mounts named namespaces.
const netnsDir = "/run/netns"

// Options describes one benchmark run.
type Options struct {
	CNI        libcni.CNI
	Conf       *libcni.NetworkConfigList
	Population int // attachments present while the cycles are measured
	Cycles     int // measured ADD+DEL cycles
	Parallel   int // workers used to fill and drain the population (not timed)
	IfName     string
	// NetnsPrefix makes namespace names unique per run; the PID is appended.
	NetnsPrefix string
	// Args are extra CNI_ARGS given to every attachment, after the pod
	// identity the benchmark generates.
	Args    [][2]string
	CapArgs map[string]interface{}
	// HostPortBase, when not 0, gives pod i a TCP hostPort HostPortBase+i
	// (to containerPort 8080) in its portMappings, as a pod with a hostPort
	// gets from the runtime.
	HostPortBase int
	// Settle is a pause between the fill and the measured cycles: the
	// kernel's own work for the interfaces just made (IPv6 duplicate
	// address detection and router solicitations, under the RTNL lock
	// every netlink request needs) then stops weighing on the cycles.
	Settle time.Duration
	Log    *slog.Logger
}

// Stats summarises a set of latencies.
type Stats struct {
	N                       int
	Min, P50, P90, P99, Max time.Duration
}

// Result of one run.
type Result struct {
	Network    string
	Population int
	Cycles     int
	Add, Del   Stats
	Fill       time.Duration // wall time to bring the node to Population
	Drain      time.Duration // wall time to remove the population again
}

type pod struct {
	netnsName   string
	containerID string
	rt          *libcni.RuntimeConf
	added       bool
}

// Run executes the benchmark. The population and every namespace made are
// removed before it returns, also when ctx is cancelled or an ADD fails.
func Run(ctx context.Context, o Options) (res Result, err error) {
	if o.Population < 0 || o.Cycles < 1 {
		return res, fmt.Errorf("population must be >= 0 and cycles >= 1 (got %d, %d)", o.Population, o.Cycles)
	}
	if o.Parallel < 1 {
		o.Parallel = 1
	}
	if o.IfName == "" {
		o.IfName = "eth0"
	}
	if o.NetnsPrefix == "" {
		o.NetnsPrefix = "qcb"
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	res = Result{Network: o.Conf.Name, Population: o.Population, Cycles: o.Cycles}
	// Cancellation stops the run between operations; it never kills a plugin
	// mid-ADD (libcni would SIGKILL it and leave a half-made attachment).
	opCtx := context.WithoutCancel(ctx)

	// The population plus one namespace per measured cycle, so every cycle
	// attaches a namespace that never held an interface, as a new pod would.
	pods := make([]*pod, o.Population+o.Cycles)
	for i := range pods {
		p, err := newPod(o, i)
		if err != nil {
			return res, err
		}
		pods[i] = p
	}

	o.Log.Info("creating pod namespaces", "count", len(pods), "prefix", pods[0].netnsName)
	created, err := createNamespaces(pods)
	defer func() {
		// Cleanup must run even when ctx is cancelled.
		start := time.Now()
		if derr := delPods(opCtx, opCtx, o, pods); derr != nil {
			err = errors.Join(err, derr)
		}
		if res.Drain == 0 {
			res.Drain = time.Since(start)
		}
		if nerr := deleteNamespaces(pods[:created]); nerr != nil {
			err = errors.Join(err, nerr)
		}
	}()
	if err != nil {
		return res, err
	}

	population, extra := pods[:o.Population], pods[o.Population:]

	o.Log.Info("filling node", "population", o.Population, "parallel", o.Parallel)
	start := time.Now()
	if err := addPods(ctx, opCtx, o, population); err != nil {
		return res, fmt.Errorf("fill to population %d: %w", o.Population, err)
	}
	res.Fill = time.Since(start)
	if o.Settle > 0 {
		o.Log.Info("settling", "for", o.Settle)
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(o.Settle):
		}
	}

	o.Log.Info("measuring", "cycles", o.Cycles)
	adds := make([]time.Duration, 0, o.Cycles)
	dels := make([]time.Duration, 0, o.Cycles)
	for i, p := range extra {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		t0 := time.Now()
		_, err := o.CNI.AddNetworkList(opCtx, o.Conf, p.rt)
		addTook := time.Since(t0)
		p.added = true // a failed ADD may leave state behind; DEL cleans it
		if err != nil {
			return res, fmt.Errorf("measured ADD %d (%s): %w", i, p.containerID[:12], err)
		}
		t0 = time.Now()
		err = o.CNI.DelNetworkList(opCtx, o.Conf, p.rt)
		delTook := time.Since(t0)
		if err != nil {
			return res, fmt.Errorf("measured DEL %d (%s): %w", i, p.containerID[:12], err)
		}
		p.added = false
		adds = append(adds, addTook)
		dels = append(dels, delTook)
	}
	res.Add = Summarize(adds)
	res.Del = Summarize(dels)

	o.Log.Info("draining node", "population", o.Population)
	start = time.Now()
	if err := delPods(ctx, opCtx, o, population); err != nil {
		return res, fmt.Errorf("drain population %d: %w", o.Population, err)
	}
	res.Drain = time.Since(start)
	return res, nil
}

func newPod(o Options, i int) (*pod, error) {
	id := make([]byte, 32)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	uid := make([]byte, 16)
	if _, err := rand.Read(uid); err != nil {
		return nil, err
	}
	h := hex.EncodeToString(uid)
	p := &pod{
		netnsName:   fmt.Sprintf("%s-%d-%d", o.NetnsPrefix, os.Getpid(), i),
		containerID: hex.EncodeToString(id),
	}
	// The identity containerd gives a Kubernetes pod sandbox.
	args := [][2]string{
		{"IgnoreUnknown", "1"},
		{"K8S_POD_NAMESPACE", "bench"},
		{"K8S_POD_NAME", fmt.Sprintf("pod-%d", i)},
		{"K8S_POD_INFRA_CONTAINER_ID", p.containerID},
		{"K8S_POD_UID", fmt.Sprintf("%s-%s-%s-%s-%s", h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])},
	}
	caps := o.CapArgs
	if o.HostPortBase != 0 {
		caps = maps.Clone(o.CapArgs)
		if caps == nil {
			caps = map[string]interface{}{}
		}
		caps["portMappings"] = []map[string]interface{}{{"hostPort": o.HostPortBase + i, "containerPort": 8080, "protocol": "tcp"}}
	}
	p.rt = &libcni.RuntimeConf{
		ContainerID:    p.containerID,
		NetNS:          filepath.Join(netnsDir, p.netnsName),
		IfName:         o.IfName,
		Args:           append(args, o.Args...),
		CapabilityArgs: caps,
	}
	return p, nil
}

// createNamespaces makes a named netns per pod and returns how many it made.
// Namespace switching happens on one locked thread that goes back to the
// node namespace after each creation; if it cannot, the thread is left
// locked so that it dies with its goroutine instead of running other code
// (and forking plugins) in a pod's namespace.
func createNamespaces(pods []*pod) (int, error) {
	type outcome struct {
		n   int
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		runtime.LockOSThread()
		origin, err := netns.Get()
		if err != nil {
			done <- outcome{0, fmt.Errorf("get node netns: %w", err)}
			return
		}
		defer origin.Close()
		for i, p := range pods {
			h, err := netns.NewNamed(p.netnsName)
			if err != nil {
				// NewNamed may have switched already; return or die locked.
				if serr := netns.Set(origin); serr != nil {
					done <- outcome{i, errors.Join(err, serr)}
					return
				}
				// It may also have left an empty mount point behind.
				if !errors.Is(err, os.ErrExist) {
					_ = os.Remove(filepath.Join(netnsDir, p.netnsName))
				}
				done <- outcome{i, fmt.Errorf("create netns %s: %w", p.netnsName, err)}
				runtime.UnlockOSThread()
				return
			}
			h.Close()
			if err := netns.Set(origin); err != nil {
				done <- outcome{i + 1, fmt.Errorf("return to node netns: %w", err)}
				return
			}
		}
		runtime.UnlockOSThread()
		done <- outcome{len(pods), nil}
	}()
	out := <-done
	return out.n, out.err
}

func deleteNamespaces(pods []*pod) error {
	var errs []error
	for _, p := range pods {
		if err := netns.DeleteNamed(p.netnsName); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("delete netns %s: %w", p.netnsName, err))
		}
	}
	return errors.Join(errs...)
}

// forEach runs fn over pods with o.Parallel workers and returns the first
// error; it stops handing out work after an error or cancellation.
func forEach(ctx context.Context, o Options, pods []*pod, fn func(*pod) error) error {
	var (
		mu   sync.Mutex
		next int
		errs []error
		wg   sync.WaitGroup
	)
	take := func() *pod {
		mu.Lock()
		defer mu.Unlock()
		if next >= len(pods) || len(errs) > 0 || ctx.Err() != nil {
			return nil
		}
		next++
		return pods[next-1]
	}
	for range min(o.Parallel, max(len(pods), 1)) {
		wg.Go(func() {
			for p := take(); p != nil; p = take() {
				if err := fn(p); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if len(errs) == 0 && ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.Join(errs...)
}

func addPods(ctx, opCtx context.Context, o Options, pods []*pod) error {
	return forEach(ctx, o, pods, func(p *pod) error {
		_, err := o.CNI.AddNetworkList(opCtx, o.Conf, p.rt)
		p.added = true
		if err != nil {
			return fmt.Errorf("ADD %s: %w", p.netnsName, err)
		}
		return nil
	})
}

// delPods removes every attachment still marked added. Unlike forEach's
// early stop, a failing DEL does not stop the others: leaving pods behind
// would poison the next run.
func delPods(ctx, opCtx context.Context, o Options, pods []*pod) error {
	var (
		mu   sync.Mutex
		errs []error
	)
	err := forEach(ctx, o, pods, func(p *pod) error {
		if !p.added {
			return nil
		}
		if err := o.CNI.DelNetworkList(opCtx, o.Conf, p.rt); err != nil {
			mu.Lock()
			errs = append(errs, fmt.Errorf("DEL %s: %w", p.netnsName, err))
			mu.Unlock()
			return nil
		}
		p.added = false
		return nil
	})
	return errors.Join(err, errors.Join(errs...))
}

// Summarize sorts a copy of d and reports nearest-rank percentiles.
func Summarize(d []time.Duration) Stats {
	if len(d) == 0 {
		return Stats{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return Stats{
		N:   len(s),
		Min: s[0],
		P50: Percentile(s, 50),
		P90: Percentile(s, 90),
		P99: Percentile(s, 99),
		Max: s[len(s)-1],
	}
}

// Percentile returns the nearest-rank p-th percentile of sorted, the
// smallest value that is >= p percent of the samples. With 30 samples p99 is
// the maximum; say so when reporting it.
func Percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := (len(sorted)*p + 99) / 100 // ceil without float rounding surprises
	rank = max(1, min(rank, len(sorted)))
	return sorted[rank-1]
}
