package cniconf

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
)

// PluginType is qoscni's plugin type in a network config.
const PluginType = "qoscni"

// File is one network config file of the CNI config dir, decoded once for
// everyone who reads it (the agent's networks and state dirs, install and
// uninstall): a conflist's plugin entries, or a single plugin config
// (.conf) as its one entry, as libcni turns one into a list.
type File struct {
	Path string
	// Name is the network's name; "" when absent or not a string, which
	// libcni refuses to load.
	Name string
	// List says the file is a conflist (it has "plugins").
	List    bool
	Plugins []Plugin

	// badName: "name" is there but not a string (ReadDir skips the file).
	badName bool
}

// Plugin is one plugin entry.
type Plugin struct {
	// Type is the entry's "type", matched without regard to letter case as
	// libcni decodes an entry; "" when absent or not a string.
	Type string
	// Raw is the entry as written: its other keys are its plugin's.
	Raw json.RawMessage
}

// IsQoscni reports whether the entry runs qoscni.
func (p Plugin) IsQoscni() bool { return p.Type == PluginType }

// Entry is what qoscni's own entries say that the agent reads.
type Entry struct {
	IPAM     json.RawMessage `json:"ipam"`
	StateDir string          `json:"stateDir"`
	Policy   struct {
		Type string `json:"type"`
	} `json:"policy"`
}

// ConfigFiles lists the names in dir that the runtime loads, in the order
// libcni loads them (the first is the network it uses): .conf, .conflist
// and .json files, sorted by name. A missing dir has none.
func ConfigFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		switch filepath.Ext(e.Name()) {
		case ".conf", ".conflist", ".json":
			if !e.IsDir() {
				names = append(names, e.Name())
			}
		}
	}
	slices.Sort(names)
	return names, nil
}

// Decode reads one network config file. It fails only when data is not a
// JSON object or its "plugins" is not a list: whoever edits a file must
// find qoscni in it even when another of its keys is wrong. Top-level keys
// match exactly, as libcni reads them.
func Decode(path string, data []byte) (*File, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, err
	}
	if top == nil {
		return nil, errors.New("not a JSON object")
	}
	f := &File{Path: path}
	if raw, ok := top["name"]; ok {
		f.badName = json.Unmarshal(raw, &f.Name) != nil
	}
	raws := []json.RawMessage{data}
	if raw, ok := top["plugins"]; ok {
		// Into a fresh slice: decoding into raws would write the entries
		// over data, which raws[0] holds.
		var list []json.RawMessage
		if json.Unmarshal(raw, &list) != nil || list == nil {
			return nil, errors.New(`"plugins" is not a list`)
		}
		raws, f.List = list, true
	}
	for _, raw := range raws {
		f.Plugins = append(f.Plugins, DecodePlugin(raw))
	}
	return f, nil
}

// DecodePlugin reads one plugin entry's type.
func DecodePlugin(raw json.RawMessage) Plugin {
	var typ struct {
		Type any `json:"type"`
	}
	_ = json.Unmarshal(raw, &typ)
	t, _ := typ.Type.(string)
	return Plugin{Type: t, Raw: raw}
}

// HasQoscni reports whether any entry runs qoscni.
func (f *File) HasQoscni() bool { return slices.ContainsFunc(f.Plugins, Plugin.IsQoscni) }

// MainIsQoscni reports whether the first entry, the main plugin, is
// qoscni: a standalone config.
func (f *File) MainIsQoscni() bool { return len(f.Plugins) > 0 && f.Plugins[0].IsQoscni() }

// Qoscni decodes the file's qoscni entries, standalone or chained. Other
// plugins' entries are not decoded beyond their type: their keys are
// theirs, whatever their JSON types.
func (f *File) Qoscni() (out []Entry, errs []error) {
	for _, p := range f.Plugins {
		if !p.IsQoscni() {
			continue
		}
		var e Entry
		if err := json.Unmarshal(p.Raw, &e); err != nil {
			errs = append(errs, fmt.Errorf("%s: qoscni entry: %w", f.Path, err))
			continue
		}
		out = append(out, e)
	}
	return out, errs
}

// ReadDir reads the config files of dir in libcni's order. Files that do
// not decode, or whose name is not a string, are reported in errs and
// skipped, as libcni would skip them.
func ReadDir(dir string) (files []*File, errs []error) {
	names, err := ConfigFiles(dir)
	if err != nil {
		return nil, []error{fmt.Errorf("read CNI config dir %s: %w", dir, err)}
	}
	for _, n := range names {
		p := filepath.Join(dir, n)
		data, err := os.ReadFile(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		f, err := Decode(p, data)
		if err == nil && f.badName {
			err = errors.New(`"name" is not a string`)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p, err))
			continue
		}
		files = append(files, f)
	}
	return files, errs
}
