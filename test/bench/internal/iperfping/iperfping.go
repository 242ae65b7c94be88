// Package iperfping reads what the benchmarks' traffic tools print: iperf3
// JSON (the receiving side's numbers) and iputils ping output, and the
// order statistics the tables quote.
package iperfping

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

type iperfSum struct {
	Start         float64 `json:"start"`
	End           float64 `json:"end"`
	Seconds       float64 `json:"seconds"`
	Bytes         float64 `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
	Omitted       bool    `json:"omitted"`
	Sender        *bool   `json:"sender"`
}

type iperfSide struct {
	Intervals []struct {
		Sum iperfSum `json:"sum"`
	} `json:"intervals"`
	End struct {
		SumReceived *iperfSum `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

type iperfDoc struct {
	iperfSide
	Server *iperfSide `json:"server_output_json"`
}

// misbooked: iperf3 3.12's server sometimes books the interval at the end
// of the client's -O period with the bytes of about one second, a length
// ("seconds") of two and start = end; it also marks one omitted interval
// fewer than the client asked for. Counting it makes a steady run read
// 6/7 of its rate; it is the omit period's data anyway, so it is left out.
func (s iperfSum) misbooked() bool {
	return (s.Start != 0 || s.End != 0) && math.Abs(s.Seconds-(s.End-s.Start)) > 0.05
}

// IperfResult is one iperf3 run seen by the receiver.
type IperfResult struct {
	// GoodputBps is the receiver's rate over the intervals that were not
	// omitted (-O): the steady state.
	GoodputBps float64
	// FirstSecondBps is the receiver's rate in the first interval (-i 1),
	// omitted or not: what the shaper lets through at the start.
	FirstSecondBps float64
}

// ParseIperf reads `iperf3 -J --get-server-output` of a server started with
// -J and picks the receiving side's numbers.
func ParseIperf(r io.Reader) (IperfResult, error) {
	var d iperfDoc
	if err := json.NewDecoder(r).Decode(&d); err != nil {
		return IperfResult{}, fmt.Errorf("decode iperf3 JSON: %w", err)
	}
	if d.Error != "" {
		return IperfResult{}, fmt.Errorf("iperf3: %s", d.Error)
	}
	side := &d.iperfSide
	if len(side.Intervals) == 0 || side.Intervals[0].Sum.Sender == nil {
		return IperfResult{}, errors.New("no intervals with a sender flag (iperf3 >= 3.9 with -J needed)")
	}
	if *side.Intervals[0].Sum.Sender {
		// The client sent: the receiver is the server.
		if d.Server == nil || len(d.Server.Intervals) == 0 {
			return IperfResult{}, errors.New("no server_output_json intervals (start the server with -J and the client with --get-server-output)")
		}
		side = d.Server
	}
	res := IperfResult{FirstSecondBps: side.Intervals[0].Sum.BitsPerSecond}
	var bytes, secs float64
	for _, iv := range side.Intervals {
		if !iv.Sum.Omitted && !iv.Sum.misbooked() {
			bytes += iv.Sum.Bytes
			secs += iv.Sum.Seconds
		}
	}
	switch {
	case secs > 0:
		res.GoodputBps = bytes * 8 / secs
	case side.End.SumReceived != nil:
		res.GoodputBps = side.End.SumReceived.BitsPerSecond
	default:
		return IperfResult{}, errors.New("no steady-state interval")
	}
	return res, nil
}

// PingResult is the RTT sample of one ping run.
type PingResult struct {
	Sent, Received int
	RTTms          []float64
}

var (
	pingReply   = regexp.MustCompile(`icmp_seq=\d+ .*time=([0-9.]+) ms`)
	pingSummary = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)
)

// ParsePing reads `ping -n` output (iputils). Duplicates are ignored.
func ParsePing(r io.Reader) (PingResult, error) {
	var p PingResult
	sc := bufio.NewScanner(r)
	summary := false
	for sc.Scan() {
		line := sc.Text()
		if m := pingReply.FindStringSubmatch(line); m != nil && !strings.Contains(line, "DUP!") {
			v, err := strconv.ParseFloat(m[1], 64)
			if err != nil {
				return p, fmt.Errorf("ping line %q: %w", line, err)
			}
			p.RTTms = append(p.RTTms, v)
		}
		if m := pingSummary.FindStringSubmatch(line); m != nil {
			p.Sent, _ = strconv.Atoi(m[1])
			p.Received, _ = strconv.Atoi(m[2])
			summary = true
		}
	}
	if err := sc.Err(); err != nil {
		return p, err
	}
	if !summary {
		return p, errors.New("no ping summary line")
	}
	return p, nil
}

// Percentile is the nearest-rank percentile of the received RTTs, NaN when
// none came back.
func (p PingResult) Percentile(q float64) float64 { return Percentile(p.RTTms, q) }

// Percentile is the nearest-rank percentile q (0 to 1) of v, NaN for none.
func Percentile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// Median of v, NaN for none.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if n := len(s); n%2 == 1 {
		return s[n/2]
	} else {
		return (s[n/2-1] + s[n/2]) / 2
	}
}

// ParseNum reads a number of a results file, NaN for anything else.
func ParseNum(s string) float64 {
	if v, err := strconv.ParseFloat(s, 64); err == nil {
		return v
	}
	return math.NaN()
}

// Ratio formats a ratio for a table: three decimals, one from 10 up, "-"
// for NaN.
func Ratio(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	if v >= 10 {
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

// Ms formats milliseconds for a table, "-" for NaN.
func Ms(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64) + " ms"
	case v >= 1:
		return strconv.FormatFloat(v, 'f', 1, 64) + " ms"
	}
	return strconv.FormatFloat(v, 'f', 2, 64) + " ms"
}
