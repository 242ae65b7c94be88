package metrics

// Names returns every metric name the collector exports, with a histogram's
// _bucket, _sum and _count series, for checks such as the dashboard test.
// The names are the data the descriptors are built from.
func (c *Collector) Names() []string {
	out := make([]string, 0, len(ownDescs)+6)
	for _, d := range ownDescs {
		out = append(out, d.name)
	}
	return append(out, nameOps,
		nameOpDuration+"_bucket", nameOpDuration+"_sum", nameOpDuration+"_count",
		nameJournalBad, nameErrors)
}
