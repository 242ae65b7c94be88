package addel

import (
	"testing"
	"time"
)

func TestPercentileNearestRank(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	thirty := make([]int, 30)
	for i := range thirty {
		thirty[i] = i + 1
	}
	cases := []struct {
		name string
		in   []time.Duration
		p    int
		want time.Duration
	}{
		{"empty", nil, 50, 0},
		{"single", ms(7), 99, 7 * time.Millisecond},
		{"p50 of 30", ms(thirty...), 50, 15 * time.Millisecond},
		{"p90 of 30", ms(thirty...), 90, 27 * time.Millisecond},
		{"p99 of 30 is the max", ms(thirty...), 99, 30 * time.Millisecond},
		{"p0 clamps to min", ms(1, 2, 3), 0, 1 * time.Millisecond},
	}
	for _, c := range cases {
		if got := Percentile(c.in, c.p); got != c.want {
			t.Errorf("%s: Percentile(p%d) = %v, want %v", c.name, c.p, got, c.want)
		}
	}
}

func TestSummarizeDoesNotReorderInput(t *testing.T) {
	in := []time.Duration{3, 1, 2}
	s := Summarize(in)
	if s.N != 3 || s.Min != 1 || s.Max != 3 || s.P50 != 2 {
		t.Fatalf("Summarize = %+v", s)
	}
	if in[0] != 3 || in[1] != 1 {
		t.Fatalf("input was reordered: %v", in)
	}
}
