package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/cni/netconf"
)

// DefaultStandaloneConflist is the standalone network config when none is
// given. Without ipam.ranges, the ranges are the node's spec.podCIDRs.
// cniVersion 1.0.0 is the newest containerd 1.6 and 1.7 accept (their
// libcni refuses a 1.1.0 result, and no pod would start); runtimes whose
// libcni reads cniVersions (containerd 2, CRI-O 1.30+) pick 1.1.0 from it
// and then call STATUS and GC.
// deploy/base/config/standalone.json is tested to be the same.
var DefaultStandaloneConflist = []byte(`{
  "cniVersion": "1.0.0",
  "cniVersions": ["1.0.0", "1.1.0"],
  "name": "qoscni",
  "plugins": [
    {
      "type": "qoscni",
      "bridge": "qoscni0",
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "stateDir": "` + StateDir + `",
      "policy": {"type": "k8s"},
      "ipam": {
        "type": "qoscni",
        "dataDir": "` + IPAMDir + `"
      },
      "capabilities": {
        "bandwidth": true,
        "io.kubernetes.cri.pod-annotations": true,
        "portMappings": true
      }
    }
  ]
}
`)

// DefaultChainedPlugin is qoscni's entry appended to the primary conflist
// when none is given. deploy/base/config/chained.json is tested to be the
// same.
var DefaultChainedPlugin = []byte(`{
  "type": "qoscni",
  "stateDir": "` + StateDir + `",
  "capabilities": {
    "bandwidth": true,
    "io.kubernetes.cri.pod-annotations": true,
    "portMappings": true
  }
}
`)

// Replaced are the reference plugins qoscni takes the place of in chained
// mode: it reads their config keys and does their job.
var Replaced = []string{"bandwidth", "portmap"}

// object is a JSON object with numbers kept as written.
type object = map[string]any

func decodeObject(data []byte) (object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var o object
	if err := dec.Decode(&o); err != nil {
		return nil, err
	}
	if o == nil {
		return nil, errors.New("not a JSON object")
	}
	if dec.More() {
		return nil, errors.New("trailing data after the JSON object")
	}
	return o, nil
}

func encodeObject(o object) []byte {
	// Go sorts map keys, so the output is a pure function of the content
	// and a re-run writes the same bytes (idempotence by comparison).
	b, err := json.MarshalIndent(o, "", "  ")
	if err != nil {
		panic(err) // only values decoded from JSON are in o
	}
	return append(b, '\n')
}

// configFile is a network config as install edits it: the shared reader's
// File says what each plugin entry is (cniconf, as the agent reads it);
// entries are the same entries of the decoded object, in the same order,
// to edit and write back with every key and number as written: the
// "plugins" list, or a single plugin config itself.
type configFile struct {
	*cniconf.File
	entries []any
}

// editable pairs o, decoded from data, with data's File.
func editable(o object, data []byte) (*configFile, error) {
	f, err := cniconf.Decode("", data)
	if err != nil {
		return nil, err
	}
	c := &configFile{File: f, entries: []any{o}}
	if f.List {
		c.entries = o["plugins"].([]any) // Decode found a list there
	}
	return c, nil
}

// hasQoscni reports whether a network config (conflist or single conf)
// runs qoscni.
func hasQoscni(data []byte) bool {
	f, err := cniconf.Decode("", data)
	return err == nil && f.HasQoscni()
}

// renderStandalone fills the template's built-in IPAM ranges from podCIDRs
// when the template has none; podCIDRs is only called when needed.
func renderStandalone(tmpl []byte, settings nodeSettings, podCIDRs func() ([]string, error)) ([]byte, error) {
	o, err := decodeObject(tmpl)
	if err != nil {
		return nil, fmt.Errorf("decode standalone conflist: %w", err)
	}
	c, err := editable(o, tmpl)
	if err != nil || !c.List {
		return nil, fmt.Errorf("standalone config is not a conflist (no \"plugins\" list)")
	}
	if err := checkVersion(o); err != nil {
		return nil, err
	}
	i := slices.IndexFunc(c.Plugins, cniconf.Plugin.IsQoscni)
	if i < 0 {
		return nil, fmt.Errorf("standalone conflist has no plugin of type %q", PluginType)
	}
	q := c.entries[i].(object) // a typed entry is an object
	settings.apply(q)
	ipamConf, _ := q["ipam"].(object)
	if ipamConf == nil {
		ipamConf = object{}
		q["ipam"] = ipamConf
	}
	if t, _ := ipamConf["type"].(string); t != "" && t != PluginType {
		out := encodeObject(o) // delegated IPAM: its config is its own business
		return out, checkEntry(out)
	}
	if ranges, _ := ipamConf["ranges"].([]any); len(ranges) == 0 {
		cidrs, err := podCIDRs()
		if err != nil {
			return nil, err
		}
		if len(cidrs) == 0 {
			return nil, errors.New("the node has no spec.podCIDRs (is the controller manager's --allocate-node-cidrs off?) and the config sets no ipam.ranges")
		}
		sets := make([]any, 0, len(cidrs))
		for _, c := range cidrs {
			sets = append(sets, []any{object{"subnet": c}})
		}
		ipamConf["ranges"] = sets
	}
	out := encodeObject(o)
	return out, checkEntry(out)
}

// checkEntry parses qoscni's entry of a conflist as the plugin will at
// every ADD, with the list's cniVersion and name: a config the plugin
// would refuse (a ceiling below the config's own delay budget, a bad
// value in the template) stops the install instead of every pod.
func checkEntry(conflist []byte) error {
	var list struct {
		CNIVersion string            `json:"cniVersion"`
		Name       string            `json:"name"`
		Plugins    []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(conflist, &list); err != nil {
		return fmt.Errorf("decode the config to write: %w", err)
	}
	for _, raw := range list.Plugins {
		e, err := decodeObject(raw)
		if err != nil || cniconf.DecodePlugin(raw).Type != PluginType {
			continue
		}
		e["cniVersion"], e["name"] = list.CNIVersion, list.Name
		if _, _, err := netconf.Parse(encodeObject(e)); err != nil {
			return fmt.Errorf("the plugin would refuse qoscni's entry: %w", err)
		}
	}
	return nil
}

func checkVersion(o object) error {
	v, _ := o["cniVersion"].(string)
	if !slices.Contains(netconf.SupportedVersions, v) {
		return fmt.Errorf("cniVersion %q: qoscni needs one of %s (chaining needs 0.3.0 or later)",
			v, strings.Join(netconf.SupportedVersions, ", "))
	}
	return nil
}

// parseEntry checks qoscni's chained plugin entry.
func parseEntry(data []byte) (object, error) {
	e, err := decodeObject(data)
	if err != nil {
		return nil, fmt.Errorf("decode chained plugin entry: %w", err)
	}
	if t := cniconf.DecodePlugin(data).Type; t != PluginType {
		return nil, fmt.Errorf("chained plugin entry has type %q, want %q", t, PluginType)
	}
	return e, nil
}

// chain returns the primary config with qoscni appended, the reference
// plugins it replaces and any older qoscni entry dropped, and which types
// were dropped. A single plugin config becomes a conflist with that plugin
// first, as libcni's ConfListFromConf reads it.
func chain(primary []byte, entry object) (out []byte, dropped []string, err error) {
	o, err := decodeObject(primary)
	if err != nil {
		return nil, nil, fmt.Errorf("decode primary config: %w", err)
	}
	if err := checkVersion(o); err != nil {
		return nil, nil, err
	}
	c, err := editable(o, primary)
	if err != nil {
		return nil, nil, err
	}
	if !c.List {
		if c.Plugins[0].Type == "" {
			return nil, nil, errors.New(`primary config has neither "plugins" nor "type"`)
		}
		o = object{"cniVersion": o["cniVersion"], "name": o["name"], "plugins": nil}
	}
	if c.MainIsQoscni() {
		return nil, nil, errors.New("the config's main plugin is qoscni itself (a standalone config), nothing to chain after")
	}
	kept := make([]any, 0, len(c.entries)+1)
	for i, p := range c.entries {
		switch t := c.Plugins[i].Type; {
		case t == PluginType:
		case slices.Contains(Replaced, t):
			dropped = append(dropped, t)
		default:
			kept = append(kept, p)
		}
	}
	if len(kept) == 0 {
		return nil, nil, errors.New("primary config has no main plugin to chain after")
	}
	o["plugins"] = append(kept, entry)
	return encodeObject(o), dropped, nil
}

// unchain drops qoscni's entries from a conflist; empty says nothing would
// be left.
func unchain(data []byte) (out []byte, empty bool, err error) {
	o, err := decodeObject(data)
	if err != nil {
		return nil, false, err
	}
	c, err := editable(o, data)
	if err != nil {
		return nil, false, err
	}
	if !c.List {
		return nil, c.MainIsQoscni(), nil
	}
	var kept []any
	for i, p := range c.entries {
		if !c.Plugins[i].IsQoscni() {
			kept = append(kept, p)
		}
	}
	if len(kept) == 0 {
		return nil, true, nil
	}
	o["plugins"] = kept
	return encodeObject(o), false, nil
}
