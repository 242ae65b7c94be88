package netconf

import (
	"encoding/json"
	"reflect"
	"slices"
	"strings"

	"github.com/qoscni/qoscni/ipam"
)

// conventionKeys are keys of a plugin's object that the CNI spec and its
// conventions define, which qoscni reads through other paths or passes on.
var conventionKeys = []string{"args", "cniVersions"}

// knownKeys are the keys of qoscni's own object, lower-cased, from the JSON
// tags of NetConf and everything it embeds.
var knownKeys = func() map[string]bool {
	m := map[string]bool{}
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if f.Anonymous {
				walk(f.Type)
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name != "" && name != "-" {
				m[strings.ToLower(name)] = true
			}
		}
	}
	walk(reflect.TypeOf(NetConf{}))
	for _, k := range conventionKeys {
		m[strings.ToLower(k)] = true
	}
	return m
}()

// unknownKeys lists the keys of stdin's object that qoscni does not read,
// and those of its ipam object when the built-in allocator reads it
// ("ipam." prefixed), sorted. encoding/json matches keys without regard to
// case, so the comparison does too.
func unknownKeys(stdin []byte, builtinIPAM bool) []string {
	var raw map[string]json.RawMessage
	if json.Unmarshal(stdin, &raw) != nil {
		return nil
	}
	var out []string
	for k := range raw {
		if !knownKeys[strings.ToLower(k)] {
			out = append(out, k)
		}
	}
	if ip, ok := raw["ipam"]; ok && builtinIPAM {
		var sub map[string]json.RawMessage
		if json.Unmarshal(ip, &sub) == nil {
			for k := range sub {
				if !slices.ContainsFunc(ipam.KnownKeys, func(s string) bool { return strings.EqualFold(s, k) }) {
					out = append(out, "ipam."+k)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}
