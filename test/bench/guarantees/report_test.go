package main

import (
	"bytes"
	"fmt"
	"math"
	"strings"
	"testing"
)

// samples builds a 100 ms counter series from per-interval rates (bit/s)
// of A, B and C starting at t0.
func samples(t0 float64, rates [][3]float64) string {
	var b strings.Builder
	var cum [3]float64
	fmt.Fprintf(&b, "%d\t0\t0\t0\n", int64(t0*1e9))
	for i, r := range rates {
		for j := range cum {
			cum[j] += r[j] / 8 * 0.1
		}
		fmt.Fprintf(&b, "%d\t%.0f\t%.0f\t%.0f\n", int64((t0+0.1*float64(i+1))*1e9), cum[0], cum[1], cum[2])
	}
	return b.String()
}

func TestRecovery(t *testing.T) {
	const capacity, request = 100e6, 60e6
	full := tcpEthShare * capacity
	var rates [][3]float64
	// 0-1 s: A has its request, B and C the rest.
	for i := 0; i < 10; i++ {
		rates = append(rates, [3]float64{0.6 * full, 0.2 * full, 0.2 * full})
	}
	// 1.0-1.1 s: A stops; B and C need 0.3 s to fill the link.
	rates = append(rates, [3]float64{0, 0.3 * full, 0.3 * full})
	rates = append(rates, [3]float64{0, 0.4 * full, 0.4 * full})
	rates = append(rates, [3]float64{0, 0.47 * full, 0.47 * full})
	for i := 0; i < 7; i++ {
		rates = append(rates, [3]float64{0, 0.5 * full, 0.5 * full})
	}
	// 2.0 s: A is back; its request after 0.4 s, 0.6 of it from 3.0 s
	// to its end at 3.5 s.
	for _, a := range []float64{0.2, 0.4, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0, 0} {
		rates = append(rates, [3]float64{a * full, (1 - a) / 2 * full, (1 - a) / 2 * full})
	}
	s, err := ReadSamples(strings.NewReader(samples(1000, rates)))
	if err != nil {
		t.Fatal(err)
	}
	idle, ret, held := Recovery(s, 1000.5, 1002.0, capacity, request)
	if math.Abs(idle-0.3) > 1e-6 || math.Abs(ret-0.4) > 1e-6 || math.Abs(held-1) > 1e-3 {
		t.Errorf("idle %v ret %v held %v, want 0.3, 0.4 and 1", idle, ret, held)
	}
	// A slow-start overshoot that does not hold is not a return.
	var overshoot [][3]float64
	for _, a := range []float64{0.7, 0.3, 0.3, 0.6, 0.6, 0.6} {
		overshoot = append(overshoot, [3]float64{a * full, 0.2 * full, 0.2 * full})
	}
	s, _ = ReadSamples(strings.NewReader(samples(1000, overshoot)))
	if _, ret, _ := Recovery(s, 999, 1000, capacity, request); math.Abs(ret-0.4) > 1e-6 {
		t.Errorf("overshoot: ret %v, want 0.4", ret)
	}
	// B and C never fill the link (capped), A never comes back.
	var capped [][3]float64
	for i := 0; i < 30; i++ {
		capped = append(capped, [3]float64{0, 0.2 * full, 0.2 * full})
	}
	s, _ = ReadSamples(strings.NewReader(samples(1000, capped)))
	idle, ret, _ = Recovery(s, 1000, 1002, capacity, request)
	if !math.IsNaN(idle) || !math.IsNaN(ret) {
		t.Errorf("capped: idle %v ret %v, want never", idle, ret)
	}
	if _, err := ReadSamples(strings.NewReader("1\t2\t3\n2\t3\n")); err == nil {
		t.Error("uneven lines must fail")
	}
}

func TestTable(t *testing.T) {
	g := func(share float64) string { return fmt.Sprintf("%.0f", share*tcpEthShare*100e6) }
	in := "meta\tsetup line\nparam\tbudget_ms\t10\n" +
		// Alternated order: ref first. qoscni meets the goals in run 1,
		// misses them in run 2 and 3 for A.
		"steady\t100000000\t100M\tegress\tref-none\t1\t" + g(0.33) + "\t" + g(0.33) + "\t" + g(0.33) + "\n" +
		"steady\t100000000\t100M\tegress\tqoscni\t1\t" + g(0.6) + "\t" + g(0.2) + "\t" + g(0.2) + "\n" +
		"steady\t100000000\t100M\tegress\tqoscni\t2\t" + g(0.5) + "\t" + g(0.2) + "\t" + g(0.3) + "\n" +
		"steady\t100000000\t100M\tegress\tqoscni\t3\t" + g(0.5) + "\t" + g(0.2) + "\t" + g(0.3) + "\n" +
		"steady\t100000000\t100M\tegress\tqoscni\t4\tfail\tfail\tfail\n" +
		"wc\t100000000\t100M\tegress\tqoscni\t1\t0.20\t0.30\t0.99\n" +
		"wc\t100000000\t100M\tegress\tqoscni\t2\t0.40\tnever\t0.5\n" +
		"wc\t100000000\t100M\tegress\tqoscni\t3\t0.30\tnever\t0.6\n" +
		"wc\t100000000\t100M\tegress\tref-caps\t1\tnever\t0.10\n" +
		"rtt\t100000000\t100M\tegress\tqoscni-high\t200\t200\t5.5\t14.9\n" +
		"rtt\t100000000\t100M\tegress\tqoscni-normal\t200\t199\t7\t30\n" +
		"scale\tflow_few\t95000000\nscale\tflow_many\t90000000\nscale\tpods_few\t10\nscale\tpods_many\t500\n" +
		"scale\tadd_plain_p50\t40\nscale\tadd_request_p50\t50\nscale\tadd_pairs\t3\nscale\tlabel\t1G\n" +
		"scale\tagent_passes\t30\nscale\tagent_records\t503\nscale\tagent_repaired\t0\nscale\tagent_p50_ms\t120.5\nscale\tagent_p99_ms\t1210\n"
	rs, err := ReadResults(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	rs.WriteMarkdown(&b)
	out := b.String()
	for _, want := range []string{
		"| 100M | egress | qoscni (A 60 %, B 20 % requested) | 0.797 | 0.956 | 0.287 | 0.956 | 0.833 | 1.000 | 1.000 | 3 (+1 failed) | missed: A 0.833 |",
		"| 100M | egress | ref, no caps | 0.526 | 1.578 | 0.316 | 0.947 | 0.550 | 1.650 | 0.990 | 1 | - |",
		"| 100M | egress | qoscni (A 60 %, B 20 % requested) | 0.3 s | never (never in 2 of 3) | 0.600 | 3 | missed: A never (never in 2 of 3) |",
		"| 100M | egress | ref, caps A 60 / B 20 / C 20 % | never | 0.1 s | - | 1 | - |",
		"| 100M | egress | qoscni, A high | 5.5 ms | 14.9 ms | 200/200 | met |",
		"| 100M | egress | qoscni, A normal | 7.0 ms | 30.0 ms | 199/200 | - |",
		"| goodput of one flow (10 vs 500 pods) | 95.0 Mbit/s | 90.0 Mbit/s | 0.947 | >= 0.90 (met) |",
		"| agent reconcile pass over 503 records (30 passes, 0 repairs): p50 / p99 | | 120.5 / 1210 ms | | p99 < 1000 ms (missed) |",
		"| ADD p50 at 500 pods: with a request vs unshaped (no nodeCapacity, medians of 3 alternating runs) | 40 ms (unshaped) | 50 ms (request) | 1.250 | <= 1.5 (met) |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	// qoscni's rows come before the reference's, whatever the run order.
	if strings.Index(out, "| 100M | egress | qoscni (A 60") > strings.Index(out, "| 100M | egress | ref, no caps") {
		t.Errorf("row order:\n%s", out)
	}
	if _, err := ReadResults(strings.NewReader("steady\t1\n")); err == nil {
		t.Error("a short line must fail")
	}
}
