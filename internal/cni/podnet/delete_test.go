package podnet

import (
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/qoscni/qoscni/internal/testnet"
)

// DeleteTogether removes a veth pair and an IFB in one request, leaves
// every other device (in the default group, in a group of its own, the
// bridge the veth was on) alone, and takes missing names in its stride.
func TestDeleteTogether(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.NewNS(t, "qdt")
	ns.Exec(t, "ip", "link", "add", "br0", "type", "bridge")
	ns.Exec(t, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "p0")
	ns.Exec(t, "ip", "link", "set", "v0", "master", "br0")
	ns.Exec(t, "ip", "link", "add", "i0", "type", "ifb")
	ns.Exec(t, "ip", "link", "add", "keep0", "type", "ifb")
	ns.Exec(t, "ip", "link", "add", "keep1", "type", "ifb")
	ns.Exec(t, "ip", "link", "set", "keep1", "group", "7")
	for _, d := range []string{"br0", "v0", "p0", "i0", "keep0", "keep1"} {
		ns.Exec(t, "ip", "link", "set", d, "up")
	}
	ns.Exec(t, "tc", "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "10mbit", "burst", "32k", "latency", "10ms")

	err := testnet.InNS(ns.Path, func() error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		if err := DeleteTogether(h, "v0", "i0", "gone0"); err != nil {
			return err
		}
		// Again: all gone now, and one name alone.
		if err := DeleteTogether(h, "v0", "i0"); err != nil {
			return err
		}
		return DeleteTogether(h, "keep0", "gone1")
	})
	if err != nil {
		t.Fatal(err)
	}
	out := ns.Exec(t, "ip", "-br", "link")
	for _, d := range []string{"v0", "p0", "i0", "keep0"} {
		if strings.Contains(out, d+" ") || strings.Contains(out, d+"@") {
			t.Errorf("%s left:\n%s", d, out)
		}
	}
	for _, d := range []string{"br0", "keep1", "lo"} {
		if !strings.Contains(out, d) {
			t.Errorf("%s deleted:\n%s", d, out)
		}
	}
}
