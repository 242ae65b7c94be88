package podnet

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/sysctl"
)

// Addr is one pod address with its gateway (nil when none).
type Addr struct {
	IPNet   net.IPNet
	Gateway net.IP
}

// Route is one pod route; a nil Gateway means the family's pod gateway.
type Route struct {
	Dst net.IPNet
	GW  net.IP
}

// PodConfig is everything pod-side that ADD applies.
type PodConfig struct {
	IfName            string
	MTU               int
	Addrs             []Addr
	Routes            []Route
	AllowIPForwarding bool
}

// Veth is a created veth pair.
type Veth struct {
	Host netlink.Link
	Pod  netlink.Link
}

// CreateVeth makes the pair from the node namespace with the peer born
// inside the pod namespace under its final name, so no temporary name can
// collide in either namespace.
func CreateVeth(host *netlink.Handle, pod *NetNS, podH *netlink.Handle, hostName, podIfName string, mtu int) (*Veth, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = hostName
	attrs.MTU = mtu
	v := &netlink.Veth{LinkAttrs: attrs, PeerName: podIfName, PeerNamespace: netlink.NsFd(int(pod.Handle)), PeerMTU: uint32(mtu)}
	if err := host.LinkAdd(v); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create veth %s/%s: %w", hostName, podIfName, err)
		}
		return nil, fmt.Errorf("create veth %s in node and %s in %s: %w", hostName, podIfName, pod.Path, err)
	}
	hl, err := host.LinkByName(hostName)
	if err != nil {
		return nil, fmt.Errorf("look up veth %s: %w", hostName, err)
	}
	pl, err := podH.LinkByName(podIfName)
	if err != nil {
		_ = host.LinkDel(hl)
		return nil, fmt.Errorf("look up %s in %s: %w", podIfName, pod.Path, err)
	}
	return &Veth{Host: hl, Pod: pl}, nil
}

// AttachHost enslaves the host end to the bridge and brings it up.
func AttachHost(h *netlink.Handle, hostLink netlink.Link, br netlink.Link, hairpin bool) error {
	name := hostLink.Attrs().Name
	if err := h.LinkSetMaster(hostLink, br); err != nil {
		return fmt.Errorf("attach %s to bridge %s: %w", name, br.Attrs().Name, err)
	}
	if hairpin {
		if err := h.LinkSetHairpin(hostLink, true); err != nil {
			return fmt.Errorf("set hairpin on %s: %w", name, err)
		}
	}
	if err := h.LinkSetUp(hostLink); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// ConfigurePod brings the pod interface up with its addresses and routes.
func ConfigurePod(pod *NetNS, podH *netlink.Handle, link netlink.Link, cfg PodConfig) error {
	if cfg.AllowIPForwarding {
		err := sysctl.Set(int(pod.Handle), "net/ipv4/ip_forward", "1")
		if err == nil {
			err = sysctl.SetIfPresent(int(pod.Handle), "net/ipv6/conf/all/forwarding", "1")
		}
		if err != nil {
			return fmt.Errorf("allow ip forwarding in %s: %w", pod.Path, err)
		}
	}
	for _, a := range cfg.Addrs {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.IPNet.IP, Mask: a.IPNet.Mask}}
		if a.IPNet.IP.To4() == nil {
			// The allocator guarantees uniqueness; DAD would only delay the
			// pod's first packets by a second or more.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := podH.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("add address %s to %s: %w", addr.IPNet, cfg.IfName, err)
		}
	}
	if err := podH.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", cfg.IfName, err)
	}
	for _, r := range cfg.Routes {
		rt := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: r.Dst.IP, Mask: r.Dst.Mask}, Gw: r.GW}
		if err := podH.RouteAdd(rt); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add route %s via %s in %s: %w", r.Dst.String(), r.GW, pod.Path, err)
		}
	}
	return nil
}

// DeleteLink removes an interface by name; one that is already gone is fine.
func DeleteLink(h *netlink.Handle, name string) error {
	link, err := h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := h.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// LinkExists reports whether an interface of that name exists.
func LinkExists(h *netlink.Handle, name string) (bool, error) {
	_, err := h.LinkByName(name)
	if err == nil {
		return true, nil
	}
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return false, nil
	}
	return false, fmt.Errorf("look up %s: %w", name, err)
}

// ErrIfExists is the CNI error for a pod interface name already in use.
func ErrIfExists(ifName, netnsPath string) error {
	return types.NewError(types.ErrInvalidEnvironmentVariables,
		fmt.Sprintf("invalid CNI_IFNAME %q: an interface of that name already exists in %s", ifName, netnsPath), "")
}
