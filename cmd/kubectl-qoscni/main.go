// Command kubectl-qoscni is the kubectl plugin `kubectl qoscni`: status,
// top and explain of the cluster's per-pod shaping (internal/kubectl).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/qoscni/qoscni/internal/agent/kube"
	"github.com/qoscni/qoscni/internal/kubectl"
)

const usage = `usage: kubectl qoscni [flags] COMMAND
  status            every shaped pod direction of the cluster: limit, request, counters, in the kernel
  top [--drops]     the busiest pod directions over --window, by throughput (or drops)
  explain POD       what POD asked for, what its node gave it, the Events, its live rates
flags:
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("kubectl-qoscni", flag.ContinueOnError)
	fs.SetOutput(stderr)
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)")
	namespace := fs.String("n", "default", "namespace of the pod (explain)")
	agentNS := fs.String("agent-namespace", "qoscni", "namespace of the qoscni agents")
	window := fs.Duration("window", 2*time.Second, "window of rates (top, explain)")
	drops := fs.Bool("drops", false, "top: order by drops per second")
	limit := fs.Int("limit", 20, "top: rows")
	timeout := fs.Duration("timeout", 30*time.Second, "whole command")
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		return 2
	}
	// Flags may follow the command too (kubectl qoscni explain web -n team).
	rest := fs.Args()
	var pos []string
	for len(rest) > 0 {
		pos = append(pos, rest[0])
		if err := fs.Parse(rest[1:]); err != nil {
			return 2
		}
		rest = fs.Args()
	}
	if len(pos) == 0 {
		fs.Usage()
		return 2
	}
	if *kubeconfig == "" {
		if home, err := os.UserHomeDir(); err == nil {
			if _, err := os.Stat(home + "/.kube/config"); err == nil {
				*kubeconfig = home + "/.kube/config"
			}
		}
	}
	client, err := kube.NewClient(*kubeconfig)
	if err != nil {
		fmt.Fprintln(stderr, "kubectl-qoscni:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c := &kubectl.Cluster{Client: client, AgentNamespace: *agentNS}
	switch {
	case pos[0] == "status" && len(pos) == 1:
		series, errs, err := c.Scrape(ctx)
		if err == nil {
			err = kubectl.WriteStatus(stdout, series)
		}
		for _, e := range errs {
			fmt.Fprintln(stderr, "kubectl-qoscni:", e)
		}
		return report(stderr, err)
	case pos[0] == "top" && len(pos) == 1:
		rates, errs, err := c.Rates(ctx, *window)
		if err == nil {
			err = kubectl.WriteTop(stdout, rates, *drops, *limit)
		}
		for _, e := range errs {
			fmt.Fprintln(stderr, "kubectl-qoscni:", e)
		}
		return report(stderr, err)
	case pos[0] == "explain" && len(pos) == 2:
		return report(stderr, c.Explain(ctx, stdout, *namespace, pos[1], *window))
	}
	fs.Usage()
	return 2
}

func report(stderr io.Writer, err error) int {
	if err != nil {
		fmt.Fprintln(stderr, "kubectl-qoscni:", err)
		return 1
	}
	return 0
}
