package cniconf

import (
	"encoding/json"
	"fmt"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/shaping"
)

// Bandwidth is what the node's qoscni network says of guaranteed
// bandwidth: the node capacity per direction (0: off that way) and the
// largest request a pod may make (0: the capacity).
type Bandwidth struct {
	File           string // the config file it was read from
	Capacity       shaping.Capacity
	MaxRequestBits uint64
}

// NodeBandwidth reads nodeCapacity and ceilings.maxRequest from the first
// file of dir, in libcni's order, that has a qoscni entry: the network the
// runtime sets pods up with. false when no file has one. A value that
// does not parse is an error naming the file and the field, as the plugin
// would refuse it.
func NodeBandwidth(dir string) (Bandwidth, bool, error) {
	files, errs := ReadDir(dir)
	for _, f := range files {
		for _, p := range f.Plugins {
			if !p.IsQoscni() {
				continue
			}
			// Decoded apart from Entry: a mistyped nodeCapacity must not
			// hide the entry's stateDir from the agent.
			var e struct {
				NodeCapacity netconf.NodeCapacityConfig `json:"nodeCapacity"`
				Ceilings     netconf.CeilingsConfig     `json:"ceilings"`
			}
			if err := json.Unmarshal(p.Raw, &e); err != nil {
				return Bandwidth{File: f.Path}, true, fmt.Errorf("%s: qoscni entry: %w", f.Path, err)
			}
			b := Bandwidth{File: f.Path}
			var err error
			for _, v := range []struct {
				field, value string
				out          *uint64
			}{
				{"nodeCapacity.ingress", e.NodeCapacity.Ingress, &b.Capacity.IngressBits},
				{"nodeCapacity.egress", e.NodeCapacity.Egress, &b.Capacity.EgressBits},
				{"ceilings.maxRequest", e.Ceilings.MaxRequest, &b.MaxRequestBits},
			} {
				if v.value == "" {
					continue
				}
				if *v.out, err = shaping.ParseBits(v.field, v.value); err != nil {
					return Bandwidth{File: f.Path}, true, fmt.Errorf("%s: %w", f.Path, err)
				}
			}
			return b, true, nil
		}
	}
	if len(errs) > 0 {
		return Bandwidth{}, false, errs[0]
	}
	return Bandwidth{}, false, nil
}
