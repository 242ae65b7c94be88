package metrics

import (
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/ipam"
)

// ipamLockTimeout bounds a scrape's wait for an IPAM store held by a plugin call.
const ipamLockTimeout = 2 * time.Second

// IPAMNetwork is a qoscni network with the built-in allocator, found in a
// CNI config file.
type IPAMNetwork = cniconf.IPAMNetwork

// FindIPAMNetworks is cniconf.FindIPAMNetworks (kept for existing callers).
func FindIPAMNetworks(dir string) ([]IPAMNetwork, []error) { return cniconf.FindIPAMNetworks(dir) }

func (c *Collector) collectIPAM(ch chan<- prometheus.Metric) {
	if c.cfg.CNIConfDir == "" {
		return
	}
	nets, errs := FindIPAMNetworks(c.cfg.CNIConfDir)
	for _, err := range errs {
		c.errors.WithLabelValues("ipam").Inc()
		c.log.Warn("read CNI config", "err", err)
	}
	for _, n := range nets {
		a, err := ipam.New(n.Config, n.Name)
		if err == nil {
			a.LockTimeout = ipamLockTimeout
			var usage []ipam.RangeUsage
			if usage, err = a.Usage(); err == nil {
				for _, u := range usage {
					l := []string{n.Name, strconv.Itoa(u.Set), strings.Join(u.Subnets, ",")}
					ch <- prometheus.MustNewConstMetric(descIPAMCap.Desc, prometheus.GaugeValue, float64(u.Total), l...)
					ch <- prometheus.MustNewConstMetric(descIPAMUsed.Desc, prometheus.GaugeValue, float64(u.Used), l...)
				}
				continue
			}
		}
		c.errors.WithLabelValues("ipam").Inc()
		c.log.Warn("ipam usage", "network", n.Name, "file", n.File, "err", err)
	}
}
