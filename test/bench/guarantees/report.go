package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/qoscni/qoscni/test/bench/internal/iperfping"
)

// tcpEthShare is TCP goodput per Ethernet frame byte of a full-size
// segment (1448 payload bytes with timestamps per 1514-byte frame): what
// a perfect frame-counting shaper leaves for iperf3 to report.
const tcpEthShare = 1448.0 / 1514.0

// Goals of issue 17 for qoscni.
const (
	goalRequest   = 0.95 // A and B each of their request (header-corrected)
	goalTotal     = 0.93 // all three of the capacity (header-corrected)
	goalRecoverS  = 1.0  // work conservation, either way
	goalP99SlackM = 5.0  // high priority's p99 over the queue-delay budget
	// Request shares of the capacity the script gives A and B.
	shareA, shareB = 0.60, 0.20
	// idleShare: A counts as idle below this share of its request.
	idleShare = 0.10
)

// Sample is one reading of the per-pod counters (A, B, C): time in unix
// seconds, cumulative bytes.
type Sample struct {
	T     float64
	Bytes []float64
}

// ReadSamples parses "unixnano<TAB>bytes..." lines of `sample`.
func ReadSamples(r io.Reader) ([]Sample, error) {
	var out []Sample
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) < 2 {
			return nil, fmt.Errorf("sample line %d: %q", n, sc.Text())
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("sample line %d: %w", n, err)
		}
		s := Sample{T: float64(ns) / 1e9}
		for _, v := range f[1:] {
			b, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return nil, fmt.Errorf("sample line %d: %w", n, err)
			}
			s.Bytes = append(s.Bytes, b)
		}
		if len(out) > 0 && len(s.Bytes) != len(out[0].Bytes) {
			return nil, fmt.Errorf("sample line %d: %d counters, earlier lines %d", n, len(s.Bytes), len(out[0].Bytes))
		}
		out = append(out, s)
	}
	return out, sc.Err()
}

// interval is the rate of each counter (bit/s) between two samples.
type interval struct {
	start, end float64
	bps        []float64
}

func intervals(s []Sample) []interval {
	var out []interval
	for i := 1; i < len(s); i++ {
		dt := s[i].T - s[i-1].T
		if dt <= 0 {
			continue
		}
		iv := interval{start: s[i-1].T, end: s[i].T}
		for j := range s[i].Bytes {
			iv.bps = append(iv.bps, (s[i].Bytes[j]-s[i-1].Bytes[j])*8/dt)
		}
		out = append(out, iv)
	}
	return out
}

// holdIntervals: a threshold counts as reached at the first interval from
// which it holds this many intervals in a row (0.3 s of 100 ms samples),
// so that a slow-start overshoot does not count as a share kept.
const holdIntervals = 3

// Recovery reads the work-conservation run: counter 0 is A, the others B
// and C. A went idle at the start of the first interval after idleAfter
// in which it carried less than idleShare of its request; idle is the
// time from there to the end of the first interval from which B and C
// together carry goalTotal of the capacity for holdIntervals intervals.
// ret is the time from returnAt (A's flow started again) to the end of
// the first interval from which A carries goalRequest of its request for
// holdIntervals intervals (or to the end of the samples). Both thresholds
// are on the goodput scale (times tcpEthShare): the counters see IP
// packets, whose headers a GSO packet carries once. NaN: never (before
// the other event, or the end).
//
// held is A's mean rate over its return from 1 s after returnAt to the end
// of its flow (its last interval over idleShare), over its request: a
// fair-share FIFO may hand a new flow its request for a moment; a
// guarantee keeps it.
func Recovery(s []Sample, idleAfter, returnAt, capacity, request float64) (idle, ret, held float64) {
	idle, ret, held = math.NaN(), math.NaN(), math.NaN()
	ivs := intervals(s)
	tIdle := math.NaN()
	for _, iv := range ivs {
		if iv.start >= idleAfter && iv.start < returnAt && iv.bps[0] < idleShare*request*tcpEthShare {
			tIdle = iv.start
			break
		}
	}
	// first is the end of the first interval in [from, to] from which ok
	// holds for holdIntervals intervals (fewer when the window ends).
	first := func(from, to float64, ok func(interval) bool) float64 {
		for i, iv := range ivs {
			if iv.start < from || iv.end > to {
				continue
			}
			held := true
			for j := i; j < len(ivs) && j < i+holdIntervals && ivs[j].end <= to; j++ {
				if !ok(ivs[j]) {
					held = false
					break
				}
			}
			if held {
				return iv.end
			}
		}
		return math.NaN()
	}
	if !math.IsNaN(tIdle) {
		idle = first(tIdle, returnAt, func(iv interval) bool {
			others := 0.0
			for _, v := range iv.bps[1:] {
				others += v
			}
			return others >= goalTotal*capacity*tcpEthShare
		}) - tIdle
	}
	ret = first(returnAt, math.Inf(1), func(iv interval) bool {
		return iv.bps[0] >= goalRequest*request*tcpEthShare
	}) - returnAt
	// A's flow ends with its last interval over idleShare.
	end := math.Inf(-1)
	for _, iv := range ivs {
		if iv.start >= returnAt && iv.bps[0] >= idleShare*request*tcpEthShare {
			end = iv.end
		}
	}
	var sum, dt float64
	for _, iv := range ivs {
		if iv.start >= returnAt+1 && iv.end <= end {
			sum += iv.bps[0] * (iv.end - iv.start)
			dt += iv.end - iv.start
		}
	}
	if dt > 0 {
		held = sum / dt / (request * tcpEthShare)
	}
	return idle, ret, held
}

// key is one (rate, direction, variant) cell.
type key struct {
	rate    uint64
	dir     string
	variant string
}

type steadyCell struct {
	label    string
	a, b, c  []float64 // goodput per run, bit/s
	failed   int
	idle     []float64 // seconds, +Inf: never
	ret      []float64
	held     []float64 // A's mean share of its request after its return
	hasRTT   bool
	sent     int
	received int
	p50, p99 float64
}

// Results are the script's result lines:
//
//	meta   TEXT
//	param  KEY VALUE                         (budget_ms)
//	steady RATE LABEL DIR VARIANT RUN GA GB GC    (GA "fail": the run failed)
//	wc     RATE LABEL DIR VARIANT RUN IDLE_S RETURN_S [HELD] ("never")
//	rtt    RATE LABEL DIR VARIANT SENT RECEIVED P50MS P99MS
//	scale  KEY VALUE
type Results struct {
	meta   []string
	params map[string]float64
	cells  map[key]*steadyCell
	order  []key
	scale  map[string]string
}

// variantRank orders the rows of one (rate, direction): qoscni first,
// then the references, whatever order the runs alternated in.
var variantRank = map[string]int{"qoscni": 0, "qoscni-normal": 1, "qoscni-high": 2, "ref-none": 3, "ref-caps": 4}

func (rs *Results) sortOrder() {
	first := map[key]int{} // first appearance of the (rate, dir) group
	for i, k := range rs.order {
		g := key{k.rate, k.dir, ""}
		if _, ok := first[g]; !ok {
			first[g] = i
		}
	}
	sort.SliceStable(rs.order, func(i, j int) bool {
		a, b := rs.order[i], rs.order[j]
		ga, gb := first[key{a.rate, a.dir, ""}], first[key{b.rate, b.dir, ""}]
		if ga != gb {
			return ga < gb
		}
		return variantRank[a.variant] < variantRank[b.variant]
	})
}

// ReadResults parses the result lines.
func ReadResults(r io.Reader) (*Results, error) {
	rs := &Results{params: map[string]float64{}, cells: map[key]*steadyCell{}, scale: map[string]string{}}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		f := strings.Split(sc.Text(), "\t")
		bad := func(err error) error { return fmt.Errorf("line %d %q: %w", n, sc.Text(), err) }
		switch {
		case len(f) == 0 || f[0] == "":
		case f[0] == "meta":
			rs.meta = append(rs.meta, strings.Join(f[1:], " "))
		case f[0] == "param" && len(f) == 3:
			v, err := strconv.ParseFloat(f[2], 64)
			if err != nil {
				return nil, bad(err)
			}
			rs.params[f[1]] = v
		case f[0] == "scale" && len(f) == 3:
			rs.scale[f[1]] = f[2]
		case (f[0] == "steady" && len(f) == 9) || (f[0] == "wc" && (len(f) == 8 || len(f) == 9)) || (f[0] == "rtt" && len(f) == 9):
			rate, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				return nil, bad(err)
			}
			c := rs.cell(key{rate, f[3], f[4]}, f[2])
			switch f[0] {
			case "steady":
				if f[6] == "fail" {
					c.failed++
					continue
				}
				v, err := floats(f[6:9])
				if err != nil {
					return nil, bad(err)
				}
				c.a, c.b, c.c = append(c.a, v[0]), append(c.b, v[1]), append(c.c, v[2])
			case "wc":
				c.idle = append(c.idle, parseSecs(f[6]))
				c.ret = append(c.ret, parseSecs(f[7]))
				if len(f) == 9 {
					c.held = append(c.held, iperfping.ParseNum(f[8]))
				}
			case "rtt":
				sent, err1 := strconv.Atoi(f[5])
				recv, err2 := strconv.Atoi(f[6])
				if err := errors.Join(err1, err2); err != nil {
					return nil, bad(err)
				}
				c.hasRTT, c.sent, c.received = true, sent, recv
				c.p50, c.p99 = iperfping.ParseNum(f[7]), iperfping.ParseNum(f[8])
			}
		default:
			return nil, bad(errors.New("unknown result line"))
		}
	}
	rs.sortOrder()
	return rs, sc.Err()
}

func floats(s []string) ([]float64, error) {
	out := make([]float64, len(s))
	for i, v := range s {
		var err error
		if out[i], err = strconv.ParseFloat(v, 64); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func parseSecs(s string) float64 {
	if v, err := strconv.ParseFloat(s, 64); err == nil {
		return v
	}
	return math.Inf(1)
}

func (rs *Results) cell(k key, label string) *steadyCell {
	c, ok := rs.cells[k]
	if !ok {
		c = &steadyCell{label: label, p50: math.NaN(), p99: math.NaN()}
		rs.cells[k] = c
		rs.order = append(rs.order, k)
	}
	return c
}

func seconds(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	never := 0
	for _, x := range v {
		if math.IsInf(x, 1) {
			never++
		}
	}
	m := iperfping.Median(v)
	s := "never"
	if !math.IsInf(m, 1) {
		s = strconv.FormatFloat(m, 'f', 1, 64) + " s"
	}
	if never > 0 && never < len(v) {
		s += fmt.Sprintf(" (never in %d of %d)", never, len(v))
	}
	return s
}

// variantNames are what the tables call the variants.
var variantNames = map[string]string{
	"qoscni":        "qoscni (A 60 %, B 20 % requested)",
	"ref-none":      "ref, no caps",
	"ref-caps":      "ref, caps A 60 / B 20 / C 20 %",
	"qoscni-high":   "qoscni, A high",
	"qoscni-normal": "qoscni, A normal",
}

func variantName(v string) string {
	if n, ok := variantNames[v]; ok {
		return n
	}
	return v
}

// steadyRatios are the medians of one cell: A and B of their requests, C
// and the total of the capacity, raw goodput.
func (c *steadyCell) steadyRatios(rate uint64) (a, b, cc, total float64) {
	capBits := float64(rate)
	var tot []float64
	for i := range c.a {
		tot = append(tot, c.a[i]+c.b[i]+c.c[i])
	}
	return iperfping.Median(c.a) / (shareA * capBits), iperfping.Median(c.b) / (shareB * capBits),
		iperfping.Median(c.c) / capBits, iperfping.Median(tot) / capBits
}

func (c *steadyCell) steadyGoals(rate uint64) string {
	a, b, _, t := c.steadyRatios(rate)
	var miss []string
	if math.IsNaN(a) || a/tcpEthShare < goalRequest {
		miss = append(miss, "A "+iperfping.Ratio(a/tcpEthShare))
	}
	if math.IsNaN(b) || b/tcpEthShare < goalRequest {
		miss = append(miss, "B "+iperfping.Ratio(b/tcpEthShare))
	}
	if math.IsNaN(t) || t/tcpEthShare < goalTotal {
		miss = append(miss, "total "+iperfping.Ratio(t/tcpEthShare))
	}
	if len(miss) == 0 {
		return "met"
	}
	return "missed: " + strings.Join(miss, ", ")
}

func (c *steadyCell) wcGoals() string {
	var miss []string
	if m := iperfping.Median(c.idle); math.IsNaN(m) || m > goalRecoverS {
		miss = append(miss, "B+C "+seconds(c.idle))
	}
	if m := iperfping.Median(c.ret); math.IsNaN(m) || m > goalRecoverS {
		miss = append(miss, "A "+seconds(c.ret))
	}
	if len(miss) == 0 {
		return "met"
	}
	return "missed: " + strings.Join(miss, ", ")
}

// WriteMarkdown prints the three tables (and the scale one when measured).
func (rs *Results) WriteMarkdown(w io.Writer) {
	for _, m := range rs.meta {
		fmt.Fprintln(w, m)
	}
	if len(rs.meta) > 0 {
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "Steady state, all three pods saturating the direction (medians over runs); goodput ratios raw, "+
		"then header-corrected (divided by 1448/1514):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| uplink | direction | setup | A/request | B/request | C/capacity | total/capacity | A/req corr. | B/req corr. | total/cap corr. | runs | goals (qoscni) |")
	fmt.Fprintln(w, "|-----:|-----------|-------|------:|------:|------:|------:|------:|------:|------:|-----:|------|")
	for _, k := range rs.order {
		c := rs.cells[k]
		if len(c.a) == 0 && c.failed == 0 {
			continue
		}
		a, b, cc, t := c.steadyRatios(k.rate)
		runs := strconv.Itoa(len(c.a))
		if c.failed > 0 {
			runs += fmt.Sprintf(" (+%d failed)", c.failed)
		}
		goal := "-"
		if k.variant == "qoscni" {
			goal = c.steadyGoals(k.rate)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", c.label, k.dir, variantName(k.variant),
			iperfping.Ratio(a), iperfping.Ratio(b), iperfping.Ratio(cc), iperfping.Ratio(t), iperfping.Ratio(a/tcpEthShare), iperfping.Ratio(b/tcpEthShare), iperfping.Ratio(t/tcpEthShare), runs, goal)
	}
	fmt.Fprintf(w, "\nRequests: A %.0f %%, B %.0f %% of the capacity, C none; for the reference rows the same numbers are the yardstick.\n"+
		"Goals (judged on the header-corrected ratios, as the shapers count frames): A and B >= %.2f of their requests, total >= %.2f.\n\n",
		shareA*100, shareB*100, goalRequest, goalTotal)

	fmt.Fprintln(w, "Work conservation (medians over runs; resolution 0.1 s):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| uplink | direction | setup | A idle -> B+C >= 0.93 capacity | A back -> A >= 0.95 request | A/request held after 1 s (corr.) | runs | goals (qoscni) |")
	fmt.Fprintln(w, "|-----:|-----------|-------|------:|------:|------:|-----:|------|")
	for _, k := range rs.order {
		c := rs.cells[k]
		if len(c.idle) == 0 {
			continue
		}
		goal := "-"
		if k.variant == "qoscni" {
			goal = c.wcGoals()
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %d | %s |\n", c.label, k.dir, variantName(k.variant),
			seconds(c.idle), seconds(c.ret), iperfping.Ratio(iperfping.Median(c.held)), len(c.idle), goal)
	}
	fmt.Fprintf(w, "\nGoal: each within %.0f s.\n\n", goalRecoverS)

	budget, ok := rs.params["budget_ms"]
	if !ok {
		budget = 10
	}
	fmt.Fprintln(w, "Priority: ping every 50 ms from A's pod to the network namespace while all three pods saturate the direction:")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| uplink | direction | setup | RTT p50 | RTT p99 | answered | goal (A high) |")
	fmt.Fprintln(w, "|-----:|-----------|-------|------:|------:|-----:|------|")
	for _, k := range rs.order {
		c := rs.cells[k]
		if !c.hasRTT {
			continue
		}
		goal := "-"
		if k.variant == "qoscni-high" {
			if !math.IsNaN(c.p99) && c.p99 <= budget+goalP99SlackM && c.received > 0 {
				goal = "met"
			} else {
				goal = "missed: p99 " + iperfping.Ms(c.p99)
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %d/%d | %s |\n", c.label, k.dir, variantName(k.variant),
			iperfping.Ms(c.p50), iperfping.Ms(c.p99), c.received, c.sent, goal)
	}
	fmt.Fprintf(w, "\nGoal: A high's p99 <= queue-delay budget (%.0f ms) + %.0f ms.\n", budget, goalP99SlackM)

	if len(rs.scale) > 0 {
		rs.writeScale(w)
	}
}

func (rs *Results) writeScale(w io.Writer) {
	get := func(k string) float64 { return iperfping.ParseNum(rs.scale[k]) }
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Scale (uplink %s): one saturating flow out of a pod, and ADD latency, with many pods in the hierarchy:\n\n", rs.scale["label"])
	fmt.Fprintln(w, "| measure | few pods | many pods | ratio | goal |")
	fmt.Fprintln(w, "|---------|------:|------:|------:|------|")
	few, many := get("flow_few"), get("flow_many")
	r := many / few
	goal := "met"
	if math.IsNaN(r) || r < 0.9 {
		goal = "missed"
	}
	fmt.Fprintf(w, "| goodput of one flow (%s vs %s pods) | %.1f Mbit/s | %.1f Mbit/s | %s | >= 0.90 (%s) |\n",
		rs.scale["pods_few"], rs.scale["pods_many"], few/1e6, many/1e6, iperfping.Ratio(r), goal)
	req, plain := get("add_request_p50"), get("add_plain_p50")
	r = req / plain
	goal = "met"
	if math.IsNaN(r) || r > 1.5 {
		goal = "missed"
	}
	pairs := ""
	if n, ok := rs.scale["add_pairs"]; ok {
		pairs = fmt.Sprintf(", medians of %s alternating runs", n)
	}
	fmt.Fprintf(w, "| ADD p50 at %s pods: with a request vs unshaped (no nodeCapacity%s) | %s ms (unshaped) | %s ms (request) | %s | <= 1.5 (%s) |\n",
		rs.scale["pods_many"], pairs, rs.scale["add_plain_p50"], rs.scale["add_request_p50"], iperfping.Ratio(r), goal)
	if p99, ok := rs.scale["agent_p99_ms"]; ok {
		goal = "met"
		if v := iperfping.ParseNum(p99); math.IsNaN(v) || v >= 1000 {
			goal = "missed"
		}
		fmt.Fprintf(w, "| agent reconcile pass over %s records (%s passes, %s repairs): p50 / p99 | | %s / %s ms | | p99 < 1000 ms (%s) |\n",
			rs.scale["agent_records"], rs.scale["agent_passes"], rs.scale["agent_repaired"], rs.scale["agent_p50_ms"], p99, goal)
	}
}
