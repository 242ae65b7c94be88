// Command shaping is the parsing and reporting half of test/bench/shaping.sh: it
// reads iperf3 JSON and ping output, and turns the script's result lines into
// the markdown tables of the shaping benchmark (qoscni against the reference
// bandwidth plugin, same pod, same runtime inputs).
//
//	shaping iperf FILE            -> "goodputBps<TAB>firstSecondBps"
//	shaping ping FILE             -> "sent<TAB>received<TAB>p50ms<TAB>p99ms"
//	shaping table RESULTS.tsv     -> markdown
//
// Both iperf3 numbers are taken on the receiving side (the server's intervals
// for a client that sends, the client's own for -R), so bytes sitting in the
// sender's socket buffer are never counted as throughput.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/qoscni/qoscni/test/bench/internal/iperfping"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: shaping iperf|ping|table FILE")
		os.Exit(2)
	}
	f, err := os.Open(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	switch os.Args[1] {
	case "iperf":
		var r IperfResult
		if r, err = ParseIperf(f); err == nil {
			fmt.Printf("%.0f\t%.0f\n", r.GoodputBps, r.FirstSecondBps)
		}
	case "ping":
		var p PingResult
		if p, err = ParsePing(f); err == nil {
			fmt.Printf("%d\t%d\t%s\t%s\n", p.Sent, p.Received, fmtMs(p.Percentile(0.50)), fmtMs(p.Percentile(0.99)))
		}
	case "table":
		var rs *Results
		if rs, err = ReadResults(f); err == nil {
			rs.WriteMarkdown(os.Stdout)
		}
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "shaping %s %s: %v\n", os.Args[1], os.Args[2], err)
		os.Exit(1)
	}
}

// The parsers live in iperfping, shared with the other benchmarks.
type (
	IperfResult = iperfping.IperfResult
	PingResult  = iperfping.PingResult
)

var (
	ParseIperf = iperfping.ParseIperf
	ParsePing  = iperfping.ParsePing
)

// fmtMs prints a latency in ms, "-" when there is none (NaN).
func fmtMs(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

// cellKey is one (rate, direction, plugin) cell of the table.
type cellKey struct {
	rate   uint64
	dir    string
	plugin string
}

type cell struct {
	label    string
	goodput  []float64 // per run, bit/s
	first    []float64 // per run, bit/s; [0] is the fresh shaper's
	sent     int
	received int
	p50, p99 float64
	hasRTT   bool
	failed   int
}

// Results are the script's result lines:
//
//	baseline DIR GOODPUT
//	steady   RATE LABEL DIR PLUGIN RUN GOODPUT FIRST      (GOODPUT "fail": the run failed)
//	rtt      RATE LABEL DIR PLUGIN SENT RECEIVED P50MS P99MS
//	meta     TEXT
type Results struct {
	baseline map[string]float64
	cells    map[cellKey]*cell
	order    []cellKey
	meta     []string
}

// ReadResults parses the result lines.
func ReadResults(r io.Reader) (*Results, error) {
	rs := &Results{baseline: map[string]float64{}, cells: map[cellKey]*cell{}}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		f := strings.Split(sc.Text(), "\t")
		bad := func(err error) error { return fmt.Errorf("line %d %q: %w", n, sc.Text(), err) }
		switch {
		case len(f) == 0 || f[0] == "":
			continue
		case f[0] == "meta":
			rs.meta = append(rs.meta, strings.Join(f[1:], " "))
		case f[0] == "baseline" && len(f) == 3:
			v, err := strconv.ParseFloat(f[2], 64)
			if err != nil {
				return nil, bad(err)
			}
			rs.baseline[f[1]] = v
		case (f[0] == "steady" && len(f) == 8) || (f[0] == "rtt" && len(f) == 9):
			rate, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				return nil, bad(err)
			}
			c := rs.cell(cellKey{rate, f[3], f[4]}, f[2])
			if f[0] == "steady" {
				if f[6] == "fail" {
					c.failed++
					continue
				}
				g, err1 := strconv.ParseFloat(f[6], 64)
				fs, err2 := strconv.ParseFloat(f[7], 64)
				if err := errors.Join(err1, err2); err != nil {
					return nil, bad(err)
				}
				c.goodput = append(c.goodput, g)
				c.first = append(c.first, fs)
				continue
			}
			sent, err1 := strconv.Atoi(f[5])
			recv, err2 := strconv.Atoi(f[6])
			if err := errors.Join(err1, err2); err != nil {
				return nil, bad(err)
			}
			c.sent, c.received, c.hasRTT = sent, recv, true
			c.p50, c.p99 = iperfping.ParseNum(f[7]), iperfping.ParseNum(f[8])
		default:
			return nil, bad(errors.New("unknown result line"))
		}
	}
	return rs, sc.Err()
}

func (rs *Results) cell(k cellKey, label string) *cell {
	c, ok := rs.cells[k]
	if !ok {
		c = &cell{label: label, p50: math.NaN(), p99: math.NaN()}
		rs.cells[k] = c
		rs.order = append(rs.order, k)
	}
	return c
}

// Goals of issue 3 for qoscni.
const (
	goalGoodputMin = 0.93
	goalGoodputMax = 1.01
	goalFirstMax   = 1.25
	goalP99Ms      = 25.0
	goalP99MinRate = 10_000_000
	// tcpEthShare is the goodput of a perfect frame-counting shaper: TCP
	// payload of a full-size segment (1448 B with timestamps) per Ethernet
	// frame (1514 B).
	tcpEthShare = 1448.0 / 1514.0
)

func (c *cell) goodputRatio(rate uint64) float64 { return iperfping.Median(c.goodput) / float64(rate) }

func (c *cell) firstRatio(rate uint64) float64 {
	if len(c.first) == 0 {
		return math.NaN()
	}
	return c.first[0] / float64(rate)
}

func (c *cell) loss() string {
	if !c.hasRTT || c.sent == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", 100*float64(c.sent-c.received)/float64(c.sent))
}

// measurable reports whether the unshaped path carries more than the rate in
// this direction (no baseline recorded: assume it does).
func (rs *Results) measurable(k cellKey) (bool, string) {
	b, ok := rs.baseline[k.dir]
	if !ok || b >= float64(k.rate) {
		return true, ""
	}
	return false, fmt.Sprintf("not measurable here (unshaped baseline %.2f Gbit/s)", b/1e9)
}

// goals lists the issue-3 goals a cell misses ("met" if none).
func (c *cell) goals(k cellKey) string {
	var miss []string
	if g := c.goodputRatio(k.rate); math.IsNaN(g) || g < goalGoodputMin || g > goalGoodputMax {
		miss = append(miss, "goodput "+iperfping.Ratio(g))
	}
	if f := c.firstRatio(k.rate); math.IsNaN(f) || f > goalFirstMax {
		miss = append(miss, "first s "+iperfping.Ratio(f))
	}
	if k.rate >= goalP99MinRate && (!c.hasRTT || math.IsNaN(c.p99) || c.p99 > goalP99Ms) {
		miss = append(miss, "RTT p99 "+iperfping.Ms(c.p99))
	}
	if len(miss) == 0 {
		return "met"
	}
	return "missed: " + strings.Join(miss, ", ")
}

// WriteMarkdown prints the per-cell table and the qoscni/reference comparison.
func (rs *Results) WriteMarkdown(w io.Writer) {
	for _, m := range rs.meta {
		fmt.Fprintln(w, m)
	}
	if len(rs.meta) > 0 {
		fmt.Fprintln(w)
	}
	if len(rs.baseline) > 0 {
		var parts []string
		for _, d := range []string{"ingress", "egress"} {
			if b, ok := rs.baseline[d]; ok {
				parts = append(parts, fmt.Sprintf("%s %.2f Gbit/s", d, b/1e9))
			}
		}
		fmt.Fprintf(w, "Unshaped baseline (same bridge + veth path, one TCP flow): %s.\n\n", strings.Join(parts, ", "))
	}
	fmt.Fprintln(w, "| rate | direction | plugin | goodput/rate (median) | runs | first second/rate (fresh pod) | RTT p50 | RTT p99 | probe loss | note |")
	fmt.Fprintln(w, "|-----:|-----------|--------|------:|-----:|------:|------:|------:|-----:|------|")
	for _, k := range rs.order {
		c := rs.cells[k]
		runs := strconv.Itoa(len(c.goodput))
		if c.failed > 0 {
			runs += fmt.Sprintf(" (+%d failed)", c.failed)
		}
		_, note := rs.measurable(k)
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", c.label, k.dir, k.plugin,
			iperfping.Ratio(c.goodputRatio(k.rate)), runs, iperfping.Ratio(c.firstRatio(k.rate)), iperfping.Ms(c.p50), iperfping.Ms(c.p99), c.loss(), note)
	}
	fmt.Fprintf(w, "\ngoodput/rate is the raw ratio of TCP goodput to the configured rate; the shaper counts whole Ethernet\n"+
		"frames, so a perfect shaper gives %.3f (1448/1514). first second/rate is the receiver's first 1 s\n"+
		"interval of the first run on a freshly added pod (full token bucket). RTT: ping every 50 ms from the\n"+
		"node to the pod while one bulk TCP flow saturates the direction; loss counts probes not answered\n"+
		"before ping's deadline.\n\n", tcpEthShare)

	// Comparison: one row per (rate, direction) that has both plugins.
	fmt.Fprintln(w, "| rate | direction | goodput/rate qoscni | goodput/rate ref | first s/rate qoscni | first s/rate ref | RTT p99 qoscni | RTT p99 ref | qoscni goals |")
	fmt.Fprintln(w, "|-----:|-----------|------:|------:|------:|------:|------:|------:|------|")
	seen := map[cellKey]bool{}
	for _, k := range rs.order {
		pair := cellKey{k.rate, k.dir, ""}
		if seen[pair] {
			continue
		}
		seen[pair] = true
		q, r := rs.cells[cellKey{k.rate, k.dir, "qoscni"}], rs.cells[cellKey{k.rate, k.dir, "ref"}]
		if q == nil && r == nil {
			continue
		}
		get := func(c *cell, f func(*cell) string) string {
			if c == nil {
				return "-"
			}
			return f(c)
		}
		gp := func(c *cell) string { return iperfping.Ratio(c.goodputRatio(k.rate)) }
		fs := func(c *cell) string { return iperfping.Ratio(c.firstRatio(k.rate)) }
		p99 := func(c *cell) string {
			if l := c.loss(); l != "-" && l != "0%" {
				return iperfping.Ms(c.p99) + " (" + l + " unanswered)"
			}
			return iperfping.Ms(c.p99)
		}
		goal := "-"
		if q != nil {
			goal = q.goals(cellKey{k.rate, k.dir, "qoscni"})
			if ok, _ := rs.measurable(k); !ok {
				goal = "not measurable here"
			}
		}
		label := rs.cells[k].label
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label, k.dir,
			get(q, gp), get(r, gp), get(q, fs), get(r, fs), get(q, p99), get(r, p99), goal)
	}
	fmt.Fprintf(w, "\nGoals (issue 3): goodput/rate %.2f-%.2f, first second <= %.2fx, RTT p99 <= %.0f ms at 10M and above.\n",
		goalGoodputMin, goalGoodputMax, goalFirstMax, goalP99Ms)
}
