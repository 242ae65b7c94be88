// Command guarantees is the measuring and reporting half of
// test/bench/guarantees.sh (issue 17): three pods share an emulated uplink,
// A with a guaranteed request of 60 % of the node capacity, B 20 %, C none,
// under qoscni's node hierarchy and under the reference bandwidth plugin.
//
//	guarantees iperf FILE                 -> "goodputBps" (receiving side)
//	guarantees ping FILE                  -> "sent<TAB>received<TAB>p50ms<TAB>p99ms"
//	guarantees sample --out F --dev a,b,c     per-pod byte counters every 100 ms
//	guarantees sample --out F --saddr ip,ip,ip
//	guarantees recover F --idle-after T --return-at T --capacity BITS --request BITS
//	                                      -> "idleSeconds<TAB>returnSeconds<TAB>heldShare"
//	guarantees table RESULTS.tsv          -> markdown
//
// sample runs until SIGTERM (or --duration). With --dev it reads the
// devices' tx_bytes (run it in the node netns: a host veth's tx counter
// counts what left the shaper towards the pod); with --saddr it counts the
// forwarded packets of each source address in an nftables table of its
// own (what left the shaper out of the pod), which it removes on exit.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/qoscni/qoscni/test/bench/internal/iperfping"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: guarantees iperf|ping|sample|recover|table ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "iperf":
		err = withFile(os.Args[2:], func(f io.Reader) error {
			r, err := iperfping.ParseIperf(f)
			if err == nil {
				fmt.Printf("%.0f\n", r.GoodputBps)
			}
			return err
		})
	case "ping":
		err = withFile(os.Args[2:], func(f io.Reader) error {
			p, err := iperfping.ParsePing(f)
			if err == nil {
				fmt.Printf("%d\t%d\t%s\t%s\n", p.Sent, p.Received, fmtMs(p.Percentile(0.50)), fmtMs(p.Percentile(0.99)))
			}
			return err
		})
	case "sample":
		err = runSample(os.Args[2:])
	case "recover":
		err = runRecover(os.Args[2:])
	case "table":
		err = withFile(os.Args[2:], func(f io.Reader) error {
			rs, err := ReadResults(f)
			if err == nil {
				rs.WriteMarkdown(os.Stdout)
			}
			return err
		})
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "guarantees %s: %v\n", strings.Join(os.Args[1:], " "), err)
		os.Exit(1)
	}
}

func withFile(args []string, fn func(io.Reader) error) error {
	if len(args) != 1 {
		return fmt.Errorf("want one file")
	}
	f, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	return fn(f)
}

func fmtMs(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

// counterSource reads cumulative byte counters, one per pod.
type counterSource interface {
	Read() ([]uint64, error)
	Close() error
}

func runSample(args []string) error {
	fs := flag.NewFlagSet("sample", flag.ContinueOnError)
	out := fs.String("out", "", "file to write samples to")
	devs := fs.String("dev", "", "comma-separated devices whose tx_bytes to read")
	saddrs := fs.String("saddr", "", "comma-separated IPv4 sources to count in the forward hook")
	interval := fs.Duration("interval", 100*time.Millisecond, "sampling interval")
	duration := fs.Duration("duration", 10*time.Minute, "stop after this long at the latest")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" || (*devs == "") == (*saddrs == "") {
		return fmt.Errorf("want --out and one of --dev, --saddr")
	}
	var src counterSource
	var err error
	if *devs != "" {
		src, err = newSysfsSource(strings.Split(*devs, ","))
	} else {
		src, err = newNftSource(strings.Split(*saddrs, ","))
	}
	if err != nil {
		return err
	}
	defer src.Close()
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	defer f.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	for {
		v, err := src.Read()
		now := time.Now()
		if err != nil {
			return err
		}
		line := strconv.FormatInt(now.UnixNano(), 10)
		for _, b := range v {
			line += "\t" + strconv.FormatUint(b, 10)
		}
		if _, err := fmt.Fprintln(f, line); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

type sysfsSource struct{ paths []string }

func newSysfsSource(devs []string) (*sysfsSource, error) {
	s := &sysfsSource{}
	for _, d := range devs {
		s.paths = append(s.paths, "/sys/class/net/"+d+"/statistics/tx_bytes")
	}
	_, err := s.Read()
	return s, err
}

func (s *sysfsSource) Read() ([]uint64, error) {
	out := make([]uint64, len(s.paths))
	for i, p := range s.paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if out[i], err = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
	}
	return out, nil
}

func (s *sysfsSource) Close() error { return nil }

func runRecover(args []string) error {
	if len(args) < 1 {
		return fmt.Errorf("want a samples file")
	}
	fs := flag.NewFlagSet("recover", flag.ContinueOnError)
	idleAfter := fs.Float64("idle-after", 0, "unix time (s) after which A's flow has ended")
	returnAt := fs.Float64("return-at", 0, "unix time (s) A's flow was started again")
	capacity := fs.Float64("capacity", 0, "node capacity, bit/s")
	request := fs.Float64("request", 0, "A's request, bit/s")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	f, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	s, err := ReadSamples(f)
	if err != nil {
		return err
	}
	idle, ret, held := Recovery(s, *idleAfter, *returnAt, *capacity, *request)
	fmt.Printf("%s\t%s\t%s\n", secs(idle), secs(ret), iperfping.Ratio(held))
	return nil
}

func secs(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "never"
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}
