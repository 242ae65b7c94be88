package podnet

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
)

// Expected is the wiring CHECK compares with the kernel.
type Expected struct {
	Bridge   string
	HostVeth string
	Pod      PodConfig
	// Gateways that must sit on the bridge (isGateway).
	Gateways []net.IPNet
}

// Verify compares the node and pod namespaces with what ADD set up and
// returns every difference it finds.
func Verify(host *netlink.Handle, pod *NetNS, podH *netlink.Handle, want Expected) error {
	var errs []error
	br, err := host.LinkByName(want.Bridge)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", want.Bridge, err)
	}
	hl, err := host.LinkByName(want.HostVeth)
	switch {
	case err != nil:
		errs = append(errs, fmt.Errorf("host veth %s: %w", want.HostVeth, err))
	case hl.Type() != "veth":
		errs = append(errs, fmt.Errorf("host interface %s is a %s, not a veth", want.HostVeth, hl.Type()))
	default:
		if hl.Attrs().MasterIndex != br.Attrs().Index {
			errs = append(errs, fmt.Errorf("host veth %s is not attached to bridge %s", want.HostVeth, want.Bridge))
		}
		if hl.Attrs().Flags&net.FlagUp == 0 {
			errs = append(errs, fmt.Errorf("host veth %s is down", want.HostVeth))
		}
		if want.Pod.MTU != 0 && hl.Attrs().MTU != want.Pod.MTU {
			errs = append(errs, fmt.Errorf("host veth %s has MTU %d, want %d", want.HostVeth, hl.Attrs().MTU, want.Pod.MTU))
		}
	}
	if len(want.Gateways) > 0 {
		have, err := host.AddrList(br, netlink.FAMILY_ALL)
		if err != nil {
			errs = append(errs, fmt.Errorf("list addresses of %s: %w", want.Bridge, err))
		}
		for _, gw := range want.Gateways {
			if !hasAddr(have, gw) {
				errs = append(errs, fmt.Errorf("gateway %s missing from bridge %s", gw.String(), want.Bridge))
			}
		}
	}

	pl, err := podH.LinkByName(want.Pod.IfName)
	if err != nil {
		errs = append(errs, fmt.Errorf("pod interface %s in %s: %w", want.Pod.IfName, pod.Path, err))
		return errors.Join(errs...)
	}
	if pl.Type() != "veth" {
		errs = append(errs, fmt.Errorf("pod interface %s is a %s, not a veth", want.Pod.IfName, pl.Type()))
	}
	if hl != nil && pl.Attrs().ParentIndex != 0 && pl.Attrs().ParentIndex != hl.Attrs().Index {
		errs = append(errs, fmt.Errorf("pod interface %s is not the peer of %s", want.Pod.IfName, want.HostVeth))
	}
	if pl.Attrs().Flags&net.FlagUp == 0 {
		errs = append(errs, fmt.Errorf("pod interface %s is down", want.Pod.IfName))
	}
	if want.Pod.MTU != 0 && pl.Attrs().MTU != want.Pod.MTU {
		errs = append(errs, fmt.Errorf("pod interface %s has MTU %d, want %d", want.Pod.IfName, pl.Attrs().MTU, want.Pod.MTU))
	}
	have, err := podH.AddrList(pl, netlink.FAMILY_ALL)
	if err != nil {
		errs = append(errs, fmt.Errorf("list addresses of %s: %w", want.Pod.IfName, err))
	}
	for _, a := range want.Pod.Addrs {
		if !hasAddr(have, a.IPNet) {
			errs = append(errs, fmt.Errorf("address %s missing from pod interface %s", a.IPNet.String(), want.Pod.IfName))
		}
	}
	routes, err := podH.RouteList(pl, netlink.FAMILY_ALL)
	if err != nil {
		errs = append(errs, fmt.Errorf("list routes of %s: %w", want.Pod.IfName, err))
	}
	for _, r := range want.Pod.Routes {
		if !hasRoute(routes, r) {
			errs = append(errs, fmt.Errorf("route %s via %s missing in pod", r.Dst.String(), r.GW))
		}
	}
	return errors.Join(errs...)
}

func hasAddr(list []netlink.Addr, want net.IPNet) bool {
	for _, a := range list {
		if a.IPNet != nil && a.IPNet.IP.Equal(want.IP) && a.IPNet.Mask.String() == want.Mask.String() {
			return true
		}
	}
	return false
}

func hasRoute(list []netlink.Route, want Route) bool {
	for _, r := range list {
		dst := r.Dst
		if dst == nil {
			// The kernel reports default routes without a destination.
			if ones, _ := want.Dst.Mask.Size(); ones != 0 {
				continue
			}
			if (r.Family == netlink.FAMILY_V4) != (want.Dst.IP.To4() != nil) {
				continue
			}
		} else if !dst.IP.Equal(want.Dst.IP) || dst.Mask.String() != want.Dst.Mask.String() {
			continue
		}
		if want.GW == nil || want.GW.Equal(r.Gw) {
			return true
		}
	}
	return false
}

// OverlayDevice is the VXLAN device through which the agent routes to the
// pods of nodes that are not on-link (package nodenet).
const OverlayDevice = "qoscni.vx"

// DefaultMTU is the MTU of the link that carries the node's default route,
// so pods never get a bigger MTU than the path out of the node (1500 when
// the node has no default route), or the VXLAN device's when it is smaller.
func DefaultMTU(h *netlink.Handle) int {
	mtu := 1500
	if routes, err := h.RouteList(nil, netlink.FAMILY_V4); err == nil {
		for _, r := range routes {
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			if l, err := h.LinkByIndex(r.LinkIndex); err == nil && l.Attrs().MTU >= 1280 {
				mtu = l.Attrs().MTU
				break
			}
		}
	}
	// Pod traffic to other nodes may leave through the agent's VXLAN
	// device (--pod-routes vxlan or auto): its MTU is the underlay's less
	// the encapsulation.
	if l, err := h.LinkByName(OverlayDevice); err == nil && l.Attrs().MTU >= 1280 && l.Attrs().MTU < mtu {
		mtu = l.Attrs().MTU
	}
	return mtu
}
