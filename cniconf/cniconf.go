// Package cniconf reads the node's CNI configuration directory, as libcni
// would, for what the node agent needs from it: the qoscni networks and
// their built-in IPAM configuration (metrics of address usage, release of
// the addresses of a garbage-collected attachment).
package cniconf

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/qoscni/qoscni/ipam"
)

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

// IPAMNetworkByName returns the qoscni network of that name with built-in
// IPAM, or false when dir holds none (a delegated IPAM plugin, or a network
// whose config file was removed).
func IPAMNetworkByName(dir, name string) (IPAMNetwork, bool, []error) {
	nets, errs := FindIPAMNetworks(dir)
	for _, n := range nets {
		if n.Name == name {
			return n, true, errs
		}
	}
	return IPAMNetwork{}, false, errs
}
