package podnet

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/sysctl"
)

// BridgeConfig is the host bridge every standalone pod attaches to.
type BridgeConfig struct {
	Name    string
	MTU     int
	Promisc bool
}

// bridgeMAC is a stable, locally administered address. Without an explicit
// address a Linux bridge takes the lowest MAC of its ports, so it would
// change as pods come and go and leave stale neighbour entries in every pod.
func bridgeMAC(name string) net.HardwareAddr {
	sum := sha256.Sum256([]byte("qoscni-bridge/" + name))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = (mac[0] | 0x02) &^ 0x01 // locally administered, unicast
	return mac
}

// EnsureBridge returns the bridge, creating it when missing. Concurrent
// plugin processes may race to create it; the loser uses the winner's.
func EnsureBridge(h *netlink.Handle, cfg BridgeConfig) (*netlink.Bridge, error) {
	link, err := h.LinkByName(cfg.Name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return nil, fmt.Errorf("look up bridge %s: %w", cfg.Name, err)
		}
		attrs := netlink.NewLinkAttrs()
		attrs.Name = cfg.Name
		attrs.MTU = cfg.MTU
		attrs.HardwareAddr = bridgeMAC(cfg.Name)
		br := &netlink.Bridge{LinkAttrs: attrs}
		if err := h.LinkAdd(br); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", cfg.Name, err)
		}
		if link, err = h.LinkByName(cfg.Name); err != nil {
			return nil, fmt.Errorf("look up bridge %s: %w", cfg.Name, err)
		}
	}
	br, ok := link.(*netlink.Bridge)
	if !ok {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("invalid bridge %q: an interface of that name exists and is a %s, not a bridge", cfg.Name, link.Type()), "")
	}
	if cfg.Promisc && br.Promisc == 0 {
		if err := h.SetPromiscOn(br); err != nil {
			return nil, fmt.Errorf("set promisc on bridge %s: %w", cfg.Name, err)
		}
	}
	if br.OperState != netlink.OperUp && br.Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(br); err != nil {
			return nil, fmt.Errorf("set bridge %s up: %w", cfg.Name, err)
		}
	}
	return br, nil
}

// EnsureGatewayAddr puts gw/prefix on the bridge unless it is already there.
// IPv6 gateways skip duplicate address detection so pods can use them at once.
func EnsureGatewayAddr(h *netlink.Handle, br netlink.Link, gw net.IP, mask net.IPMask) error {
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: gw, Mask: mask}}
	if gw.To4() == nil {
		addr.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(br, addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add gateway %s to bridge %s: %w", addr.IPNet, br.Attrs().Name, err)
	}
	return nil
}

// EnableForwarding turns on routing in the node namespace for the families
// the bridge is a gateway for.
func EnableForwarding(v4, v6 bool) error {
	if v4 {
		if err := sysctl.Set(sysctl.Current, "net/ipv4/ip_forward", "1"); err != nil {
			return err
		}
	}
	if v6 {
		if err := sysctl.SetIfPresent(sysctl.Current, "net/ipv6/conf/all/forwarding", "1"); err != nil {
			return err
		}
	}
	return nil
}
