package reltest

import (
	"fmt"
	"sort"
	"time"
)

// percentile is the nearest-rank p-th percentile (p in [0, 1]) of sorted
// durations; 0 for none.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(p*float64(len(d))+0.999999) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(d) {
		i = len(d) - 1
	}
	return d[i]
}

// Stats summarizes durations (in any order) as "p50 … p99 … max …",
// rounded to the millisecond.
func Stats(d []time.Duration) string {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	r := func(x time.Duration) time.Duration { return x.Round(time.Millisecond) }
	return fmt.Sprintf("p50 %v p99 %v max %v", r(percentile(s, 0.50)), r(percentile(s, 0.99)), r(percentile(s, 1)))
}
