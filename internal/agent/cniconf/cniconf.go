// Package cniconf reads the node's CNI configuration directory, as libcni
// would, for what the node agent needs from it: the qoscni networks, their
// built-in IPAM configuration (metrics of address usage, release of the
// addresses of a garbage-collected attachment) and their state
// directories (StateSources: which records the agent reads).
package cniconf

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"

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

// pluginJSON is what the agent reads of a plugin entry.
type pluginJSON struct {
	Type     string          `json:"type"`
	IPAM     json.RawMessage `json:"ipam"`
	StateDir string          `json:"stateDir"`
}

// confFile is one config file: a conflist's plugin entries, or a .conf's
// one plugin.
type confFile struct {
	path    string
	name    string
	plugins []json.RawMessage
}

// qoscni decodes the file's qoscni entries, standalone or chained. Other
// plugins' entries are not decoded beyond their type: their keys are
// theirs, whatever their JSON types.
func (f *confFile) qoscni() (out []pluginJSON, errs []error) {
	for _, raw := range f.plugins {
		var typ struct {
			Type any `json:"type"`
		}
		if json.Unmarshal(raw, &typ) != nil || typ.Type != "qoscni" {
			continue
		}
		var pl pluginJSON
		if err := json.Unmarshal(raw, &pl); err != nil {
			errs = append(errs, fmt.Errorf("%s: qoscni entry: %w", f.path, err))
			continue
		}
		out = append(out, pl)
	}
	return out, errs
}

// readDir reads the .conflist/.conf/.json files of dir in libcni's order.
// Files that do not parse are reported in errs and skipped, as libcni
// would skip them.
func readDir(dir string) (files []confFile, errs []error) {
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
	for _, n := range names {
		p := filepath.Join(dir, n)
		data, err := os.ReadFile(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var f struct {
			Name    string            `json:"name"`
			Plugins []json.RawMessage `json:"plugins"`
		}
		if err := json.Unmarshal(data, &f); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p, err))
			continue
		}
		plugins := f.Plugins
		if plugins == nil {
			plugins = []json.RawMessage{data}
		}
		files = append(files, confFile{path: p, name: f.Name, plugins: plugins})
	}
	return files, errs
}

// FindIPAMNetworks reads the .conflist/.conf/.json files of dir and returns
// the qoscni networks that use the built-in allocator. Files that do not
// parse are reported in errs and skipped, as libcni would skip them.
func FindIPAMNetworks(dir string) (nets []IPAMNetwork, errs []error) {
	files, errs := readDir(dir)
	seen := map[string]bool{}
	for _, f := range files {
		p := f.path
		entries, perrs := f.qoscni()
		errs = append(errs, perrs...)
		for _, pl := range entries {
			if len(pl.IPAM) == 0 || seen[f.name] {
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
			seen[f.name] = true
			nets = append(nets, IPAMNetwork{Name: f.name, File: p, Config: cfg})
		}
	}
	return nets, errs
}

// StateDirs returns the stateDir of every qoscni plugin entry of dir's
// files, standalone or chained (netconf.DefaultStateDir where the key is
// absent), each once. A relative stateDir, which the plugin refuses, is
// reported in errs.
func StateDirs(dir string) (dirs []string, errs []error) {
	files, errs := readDir(dir)
	seen := map[string]bool{}
	for _, f := range files {
		entries, perrs := f.qoscni()
		errs = append(errs, perrs...)
		for _, pl := range entries {
			d := pl.StateDir
			if d == "" {
				d = netconf.DefaultStateDir
			}
			if !filepath.IsAbs(d) {
				errs = append(errs, fmt.Errorf("%s: stateDir %q is not an absolute path", f.path, d))
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
