// Package cniconf reads the node's CNI configuration directory, as libcni
// would: which files, in which order, decoded into File values with their
// plugin entries (ReadDir, Decode). The agent takes from them the qoscni
// networks, their built-in IPAM configuration (metrics of address usage,
// release of the addresses of a garbage-collected attachment) and their
// state directories (StateSources: which records the agent reads); install
// and uninstall find qoscni's entries in them before editing a file.
package cniconf

import (
	"encoding/json"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/ipam"
)

// IPAMNetwork is a qoscni network with the built-in allocator, found in a
// CNI config file.
type IPAMNetwork struct {
	Name   string
	File   string
	Config *ipam.Config
}

// FindIPAMNetworks reads the .conflist/.conf/.json files of dir and returns
// the qoscni networks that use the built-in allocator. Files that do not
// parse are reported in errs and skipped, as libcni would skip them.
func FindIPAMNetworks(dir string) (nets []IPAMNetwork, errs []error) {
	files, errs := ReadDir(dir)
	seen := map[string]bool{}
	for _, f := range files {
		p := f.Path
		entries, perrs := f.Qoscni()
		errs = append(errs, perrs...)
		for _, pl := range entries {
			if len(pl.IPAM) == 0 || seen[f.Name] {
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

// StateDirs returns the stateDir of every qoscni plugin entry of dir's
// files, standalone or chained (netconf.DefaultStateDir where the key is
// absent), each once. A relative stateDir, which the plugin refuses, is
// reported in errs.
func StateDirs(dir string) (dirs []string, errs []error) {
	files, errs := ReadDir(dir)
	seen := map[string]bool{}
	for _, f := range files {
		entries, perrs := f.Qoscni()
		errs = append(errs, perrs...)
		for _, pl := range entries {
			d := pl.StateDir
			if d == "" {
				d = netconf.DefaultStateDir
			}
			if !filepath.IsAbs(d) {
				errs = append(errs, fmt.Errorf("%s: stateDir %q is not an absolute path", f.Path, d))
				continue
			}
			d = filepath.Clean(d)
			if !seen[d] {
				seen[d] = true
				dirs = append(dirs, d)
			}
		}
	}
	return dirs, errs
}

// PolicyNetworks are the standalone qoscni networks of dir's files that
// enforce NetworkPolicy ("policy": {"type": "k8s"}), by name, with their
// state directory.
func PolicyNetworks(dir string) (nets map[string]string, errs []error) {
	files, errs := ReadDir(dir)
	nets = map[string]string{}
	for _, f := range files {
		if !f.MainIsQoscni() || f.Name == "" {
			continue
		}
		entries, perrs := f.Qoscni()
		errs = append(errs, perrs...)
		if len(entries) == 0 || entries[0].Policy.Type != netconf.PolicyK8s {
			continue
		}
		d := entries[0].StateDir
		if d == "" {
			d = netconf.DefaultStateDir
		}
		if _, seen := nets[f.Name]; !seen {
			nets[f.Name] = filepath.Clean(d)
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

// StateSources are where the node agent learns the node's qoscni state
// directories. A node may carry several qoscni networks (under Multus, a
// default network and secondary ones), each with its own stateDir, and
// the agent must read every one: a record it does not read is an
// attachment whose devices it would take for leftovers, and whose
// shaping it would neither repair nor reshape.
type StateSources struct {
	Own      string // the agent's --state-dir
	ConfDir  string // --cni-conf-dir: the stateDir of each qoscni entry ("" = none)
	Registry string // the directories the plugin registered (state.RegisteredDirs; "" = none)
}

// Dirs lists the state directories, Own first, each once (by path, and by
// identity for a directory reached by two paths). It is cheap enough to
// call on every pass and scrape, so a new conflist or registration is
// picked up without a restart. errs are the files it could not read; the
// directories it found are still returned.
func (s StateSources) Dirs() (dirs []string, errs []error) {
	var all []string
	if s.Own != "" {
		all = append(all, filepath.Clean(s.Own))
	}
	if s.ConfDir != "" {
		d, e := StateDirs(s.ConfDir)
		all, errs = append(all, d...), append(errs, e...)
	}
	d, e := state.RegisteredDirs(s.Registry)
	all, errs = append(all, d...), append(errs, e...)
	type ident struct{ dev, ino uint64 }
	seenPath := map[string]bool{}
	seenID := map[ident]bool{}
	for _, d := range all {
		if seenPath[d] {
			continue
		}
		seenPath[d] = true
		var st unix.Stat_t
		if unix.Stat(d, &st) == nil {
			id := ident{st.Dev, st.Ino}
			if seenID[id] {
				continue
			}
			seenID[id] = true
		}
		dirs = append(dirs, d)
	}
	return dirs, errs
}
