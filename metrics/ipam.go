package metrics

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qoscni/qoscni/ipam"
)

// ipamLockTimeout bounds a scrape's wait for an IPAM store held by a plugin call.
const ipamLockTimeout = 2 * time.Second

// IPAMNetwork is a qoscni network with the built-in allocator, found in a
// CNI config file.
type IPAMNetwork struct {
	Name   string
	File   string
	Config *ipam.Config
}

type pluginJSON struct {
	Type string          `json:"type"`
	IPAM json.RawMessage `json:"ipam"`
}

// FindIPAMNetworks reads the .conflist/.conf/.json files of dir and returns
// the qoscni networks that use the built-in allocator. Files that do not
// parse are reported in errs and skipped, as libcni would skip them.
func FindIPAMNetworks(dir string) (nets []IPAMNetwork, errs []error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, []error{fmt.Errorf("read CNI config dir %s: %w", dir, err)}
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		switch filepath.Ext(e.Name()) {
		case ".conflist", ".conf", ".json":
			if !e.IsDir() {
				names = append(names, e.Name())
			}
		}
	}
	sort.Strings(names)
	seen := map[string]bool{}
	for _, n := range names {
		p := filepath.Join(dir, n)
		data, err := os.ReadFile(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var f struct {
			Name    string       `json:"name"`
			Plugins []pluginJSON `json:"plugins"`
			pluginJSON
		}
		if err := json.Unmarshal(data, &f); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p, err))
			continue
		}
		plugins := f.Plugins
		if plugins == nil {
			plugins = []pluginJSON{f.pluginJSON}
		}
		for _, pl := range plugins {
			if pl.Type != "qoscni" || len(pl.IPAM) == 0 || seen[f.Name] {
				continue
			}
			var typ struct {
				Type string `json:"type"`
			}
			_ = json.Unmarshal(pl.IPAM, &typ)
			if typ.Type != "" && typ.Type != ipam.PluginType {
				continue
			}
			cfg := &ipam.Config{}
			if err := json.Unmarshal(pl.IPAM, cfg); err != nil {
				errs = append(errs, fmt.Errorf("%s: ipam: %w", p, err))
				continue
			}
			if len(cfg.Ranges) == 0 {
				continue // "ipam": {} in chained mode
			}
			if err := cfg.Validate(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", p, err))
				continue
			}
			seen[f.Name] = true
			nets = append(nets, IPAMNetwork{Name: f.Name, File: p, Config: cfg})
		}
	}
	return nets, errs
}

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
					ch <- prometheus.MustNewConstMetric(descIPAMCap, prometheus.GaugeValue, float64(u.Total), l...)
					ch <- prometheus.MustNewConstMetric(descIPAMUsed, prometheus.GaugeValue, float64(u.Used), l...)
				}
				continue
			}
		}
		c.errors.WithLabelValues("ipam").Inc()
		c.log.Warn("ipam usage", "network", n.Name, "file", n.File, "err", err)
	}
}
