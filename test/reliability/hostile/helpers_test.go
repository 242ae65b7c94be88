package hostile_test

import (
	"testing"

	"github.com/qoscni/qoscni/test/reliability/reltest"
)

const (
	network = "qhostile"
	bridge  = "qhbr0"
)

// hostileNet is the standalone network of the tests here. The ranges are
// small (40 addresses each) so that a test can hand out every free address
// and see that none of those already on disk comes out.
var hostileNet = reltest.Net{Name: network, Bridge: bridge, Ranges: []map[string]any{
	{"subnet": "10.97.0.0/24", "rangeStart": "10.97.0.10", "rangeEnd": "10.97.0.49"},
	{"subnet": "fd97::/64", "rangeStart": "fd97::10", "rangeEnd": "fd97::37"},
}}

// shapedPorts gives a pod shaping both ways and the hostPorts listed.
func shapedPorts(hostPorts ...int) func(map[string]any) {
	return func(c map[string]any) {
		rc := map[string]any{"bandwidth": map[string]any{"ingressRate": 10_000_000, "ingressBurst": 200_000, "egressRate": 20_000_000, "egressBurst": 200_000}}
		var pms []any
		for _, hp := range hostPorts {
			pms = append(pms, map[string]any{"hostPort": hp, "containerPort": 80, "protocol": "tcp"})
		}
		if len(pms) > 0 {
			rc["portMappings"] = pms
		}
		c["runtimeConfig"] = rc
	}
}

// addrs decodes the IPs of an ADD result (t.Errorf, not Fatal: callers
// run it in goroutines).
func addrs(t testing.TB, stdout []byte) []string {
	t.Helper()
	ips, err := reltest.Addrs(stdout)
	if err != nil {
		t.Error(err)
	}
	return ips
}
