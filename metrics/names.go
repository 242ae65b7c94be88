package metrics

import (
	"regexp"

	"github.com/prometheus/client_golang/prometheus"
)

var fqNameRE = regexp.MustCompile(`fqName: "([^"]+)"`)

// Names returns every metric name the collector exports, with a histogram's
// _bucket, _sum and _count series, for checks such as the dashboard test.
func (c *Collector) Names() []string {
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	var out []string
	for d := range ch {
		m := fqNameRE.FindStringSubmatch(d.String())
		if m == nil {
			continue
		}
		if m[1] == "qoscni_cni_operation_duration_seconds" {
			out = append(out, m[1]+"_bucket", m[1]+"_sum", m[1]+"_count")
			continue
		}
		out = append(out, m[1])
	}
	return out
}
