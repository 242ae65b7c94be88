package portmap

import (
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/cni/netconf"
)

// TestSCTPMappingEncoding: an SCTP hostPort becomes the map element the
// kernel lists as "sctp . PORT : POD . PORT", in both families and for a
// hostIP, passes Check and goes with Del. Only the encoding is tested:
// the kernels of these machines have no SCTP sockets (socket() answers
// EPROTONOSUPPORT), so no SCTP packet crosses the mapping here.
func TestSCTPMappingEncoding(t *testing.T) {
	w := newWorld(t)
	p := w.addPod(t)
	sctp := netconf.PortMapping{HostPort: 9132, ContainerPort: 132, Protocol: "sctp"}
	maps := plan(t, p, sctp, on(netconf.PortMapping{HostPort: 9133, ContainerPort: 133, Protocol: "sctp"}, nodeAddr4))
	w.add(t, p, maps)
	// nft prints the owner comment between key and value.
	for _, tc := range []struct{ set, key, val string }{
		{"hostport4", "sctp . 9132 comment", ": " + p.ip4.String() + " . 132"},
		{"hostport6", "sctp . 9132 comment", ": " + p.ip6.String() + " . 132"},
		{"hostip-hostport4", nodeAddr4 + " . sctp . 9133 comment", ": " + p.ip4.String() + " . 133"},
	} {
		if out := w.node.Exec(t, "nft", "list", "map", "inet", "qoscni", tc.set); !strings.Contains(out, tc.key) || !strings.Contains(out, tc.val) {
			t.Errorf("map %s lacks %q ... %q:\n%s", tc.set, tc.key, tc.val, out)
		}
	}
	if err := w.m.Check(p.owner, maps); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if err := w.m.Del(p.owner, maps); err != nil {
		t.Fatalf("Del: %v", err)
	}
	if out := w.node.Exec(t, "nft", "list", "map", "inet", "qoscni", "hostport4"); strings.Contains(out, "sctp") {
		t.Errorf("SCTP element left after Del:\n%s", out)
	}
}
