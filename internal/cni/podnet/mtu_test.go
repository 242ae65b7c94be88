package podnet

import (
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/testnet"
)

// The pods' default MTU: the default route's link, then the agent's VXLAN
// device when it is smaller (pods reaching other nodes through it).
func TestDefaultMTUFollowsOverlay(t *testing.T) {
	node := testnet.NewNode(t)
	node.Exec(t, "ip", "link", "add", "up0", "mtu", "9000", "type", "veth", "peer", "name", "up1")
	node.Exec(t, "ip", "addr", "add", "192.168.77.1/24", "dev", "up0")
	node.Exec(t, "ip", "link", "set", "up0", "up")
	node.Exec(t, "ip", "link", "set", "up1", "up")
	node.Exec(t, "ip", "route", "add", "default", "via", "192.168.77.2")
	ns, err := netns.GetFromPath(node.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if got := DefaultMTU(h); got != 9000 {
		t.Fatalf("MTU %d, want the default route link's 9000", got)
	}
	node.Exec(t, "ip", "link", "add", OverlayDevice, "mtu", "8950", "type", "vxlan", "id", "4242", "dstport", "4789", "local", "192.168.77.1", "dev", "up0", "nolearning")
	if got := DefaultMTU(h); got != 8950 {
		t.Fatalf("MTU %d, want the VXLAN device's 8950", got)
	}
}
