// Package reltest holds what the reliability tests (reliability,
// test/reliability/hostile and test/reliability/stress) share: the standalone
// network configs they send, a plugin invocation with a time limit, a
// snapshot of everything a pod can leave in a node, and latency
// statistics. Only tests import it.
package reltest

import (
	"encoding/json"
	"maps"
	"strings"

	"github.com/qoscni/qoscni/internal/testnet"
)

// CNIVersion is the CNI version of every config here.
const CNIVersion = "1.1.0"

// Net is a standalone qoscni network as the reliability tests configure
// it: a bridge that is the pods' default gateway, ipMasq, hairpin mode,
// the bandwidth and portMappings capabilities, and the built-in IPAM, with
// the state and IPAM directories of the test's node. The fields are what
// differs between the test packages.
type Net struct {
	Name   string // the CNI network name
	Bridge string
	// Ranges are the IPAM range sets, one per address family, each of one
	// range: {"subnet": ...}, optionally with "rangeStart" and "rangeEnd".
	Ranges []map[string]any
	// PodAnnotations adds the io.kubernetes.cri.pod-annotations capability.
	PodAnnotations bool
}

// BaseConf is the network's config for node n, as a map to change before
// Marshal. Every call returns a new map.
func (nw Net) BaseConf(n *testnet.Node) map[string]any {
	caps := map[string]any{"bandwidth": true, "portMappings": true}
	if nw.PodAnnotations {
		caps["io.kubernetes.cri.pod-annotations"] = true
	}
	ranges := make([]any, 0, len(nw.Ranges))
	for _, r := range nw.Ranges {
		ranges = append(ranges, []any{maps.Clone(r)})
	}
	return map[string]any{
		"cniVersion":       CNIVersion,
		"name":             nw.Name,
		"type":             "qoscni",
		"bridge":           nw.Bridge,
		"isDefaultGateway": true,
		"ipMasq":           true,
		"hairpinMode":      true,
		"stateDir":         n.StateDir,
		"capabilities":     caps,
		"ipam": map[string]any{
			"ranges":  ranges,
			"dataDir": n.IPAMDir,
		},
	}
}

// ConfWith is BaseConf changed by mutate (nil: unchanged), marshalled.
func (nw Net) ConfWith(n *testnet.Node, mutate func(map[string]any)) []byte {
	c := nw.BaseConf(n)
	if mutate != nil {
		mutate(c)
	}
	return Marshal(c)
}

// PodConf gives pod i of a round its runtimeConfig: i%4 == 1 shaped,
// 2 a hostPort (20000+i), 3 both, 0 plain.
func (nw Net) PodConf(n *testnet.Node, i int) []byte {
	c := nw.BaseConf(n)
	rc := map[string]any{}
	if i%4 == 1 || i%4 == 3 {
		rc["bandwidth"] = map[string]any{"ingressRate": 10_000_000, "ingressBurst": 200_000, "egressRate": 20_000_000, "egressBurst": 200_000}
	}
	if i%4 >= 2 {
		rc["portMappings"] = []any{map[string]any{"hostPort": 20000 + i, "containerPort": 80, "protocol": "tcp"}}
	}
	if len(rc) > 0 {
		c["runtimeConfig"] = rc
	}
	return Marshal(c)
}

// GCConf is a CNI GC config listing the attachments the runtime still
// knows, each "containerID/ifname".
func (nw Net) GCConf(n *testnet.Node, valid ...string) []byte {
	c := nw.BaseConf(n)
	list := make([]any, 0, len(valid))
	for _, v := range valid {
		cid, ifname, _ := strings.Cut(v, "/")
		list = append(list, map[string]any{"containerID": cid, "ifname": ifname})
	}
	c["cni.dev/valid-attachments"] = list
	return Marshal(c)
}

// Marshal is json.Marshal for values that always encode; it panics on an
// error.
func Marshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// WithPrev adds the ADD result prev to conf as prevResult, as a runtime
// does for CHECK.
func WithPrev(conf, prev []byte) []byte {
	var c, p map[string]any
	if err := json.Unmarshal(conf, &c); err != nil {
		panic(err)
	}
	if err := json.Unmarshal(prev, &p); err != nil {
		panic(err)
	}
	c["prevResult"] = p
	return Marshal(c)
}
