package nodenet

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
)

// The VXLAN backend. Every node in mode vxlan or auto that needs it has
// one kernel VXLAN device, VXLANDevice, owned by qoscni:
//
//   - VNI VXLANVNI, UDP port VXLANPort, local address = the node's IPv4
//     InternalIP (IPv6 pod CIDRs ride the IPv4 underlay too), on the link
//     that holds that address, learning off (every entry is programmed);
//   - MTU = that link's MTU - VXLANOverhead;
//   - MAC derived from the local address (VTEPMAC), so a device made again
//     after a restart or by another agent version keeps the MAC the peers
//     already know; the MAC is published in the Node annotation
//     VTEPMACAnnotation.
//
// For a peer's pod CIDR routed over VXLAN: a route "podCIDR via <first
// address of podCIDR> dev qoscni.vx onlink proto 81" (the flannel scheme:
// the gateway is a name for the peer's VTEP, no address is assigned to
// any device), a permanent neighbour entry gateway -> peer VTEP MAC on the
// device, and an FDB entry peer VTEP MAC -> dst peer IPv4 InternalIP. The
// device is qoscni's, so every neighbour and FDB entry on it is too: they
// are reconciled desired vs listed, like the routes.
//
// The device is deleted when no pod CIDR wants VXLAN any more (mode auto,
// all peers on-link). Modes off and hostgw never touch it: switching a
// node from vxlan to hostgw removes the VXLAN routes (they are proto 81)
// but leaves the idle device; delete it by hand if wanted.
//
// Pods' MTU: the plugin sizes pod interfaces from the default-route link.
// With VXLAN in use, pods created after the device get its MTU (the
// plugin takes the smaller of the default route's link and the device,
// podnet.DefaultMTU) unless the conflist sets "mtu"; pods created before
// keep theirs, which the agent's warning at device creation points out.
const (
	VXLANDevice = podnet.OverlayDevice
	// VXLANVNI: 4242, fixed; only qoscni's device uses it on the node.
	VXLANVNI = 4242
	// VXLANPort is the IANA VXLAN port (flannel uses the kernel's old
	// default 8472; using 4789 keeps the two apart on a node migrating
	// between them).
	VXLANPort = 4789
	// VXLANOverhead: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner
	// Ethernet (14).
	VXLANOverhead = 50
	// VTEPMACAnnotation holds a node's VTEP MAC ("0a:51:c0:a8:32:01").
	VTEPMACAnnotation = "qoscni.io/vtep-mac"
)

// VTEPMAC is the MAC of the VXLAN device of a node with IPv4 underlay
// address local: locally administered unicast 0a:51 + the four bytes.
func VTEPMAC(local net.IP) net.HardwareAddr {
	v4 := local.To4()
	return net.HardwareAddr{0x0a, 0x51, v4[0], v4[1], v4[2], v4[3]}
}

// vtep makes the device as pl needs it (or deletes it when unneeded) and
// returns its index (0 = none).
func (r *Routes) vtep(pl Plan, res *Result) (int, error) {
	l, err := r.h.LinkByName(VXLANDevice)
	var nf netlink.LinkNotFoundError
	if err != nil && !errors.As(err, &nf) {
		return 0, fmt.Errorf("look up %s: %w", VXLANDevice, err)
	}
	if !pl.NeedVTEP || pl.Local == nil {
		if l != nil {
			if err := r.h.LinkDel(l); err != nil {
				return 0, fmt.Errorf("delete unused %s: %w", VXLANDevice, err)
			}
		}
		return 0, nil
	}
	under, err := r.linkOf(pl.Local)
	if err != nil {
		return 0, err
	}
	mtu := under.Attrs().MTU - VXLANOverhead
	mac := VTEPMAC(pl.Local)
	if l != nil {
		vx, ok := l.(*netlink.Vxlan)
		if !ok {
			return 0, fmt.Errorf("%s exists and is a %s, not a VXLAN device; left alone", VXLANDevice, l.Type())
		}
		if vx.VxlanId != VXLANVNI || vx.Port != VXLANPort || !vx.SrcAddr.Equal(pl.Local) || vx.Learning ||
			vx.VtepDevIndex != under.Attrs().Index || !bytes.Equal(vx.HardwareAddr, mac) {
			// The node's address changed (or the device was edited):
			// VNI, port and local cannot be changed in place.
			if err := r.h.LinkDel(l); err != nil {
				return 0, fmt.Errorf("delete outdated %s: %w", VXLANDevice, err)
			}
			l = nil
		}
	}
	if l == nil {
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: VXLANDevice, MTU: mtu, HardwareAddr: mac},
			VxlanId:   VXLANVNI, VtepDevIndex: under.Attrs().Index, SrcAddr: pl.Local,
			Port: VXLANPort, Learning: false,
		}
		if err := r.h.LinkAdd(vx); err != nil {
			return 0, fmt.Errorf("create %s (vni %d, local %s): %w", VXLANDevice, VXLANVNI, pl.Local, err)
		}
		if l, err = r.h.LinkByName(VXLANDevice); err != nil {
			return 0, fmt.Errorf("look up %s: %w", VXLANDevice, err)
		}
		res.VTEPCreated = true
	}
	if l.Attrs().MTU != mtu {
		if err := r.h.LinkSetMTU(l, mtu); err != nil {
			return 0, fmt.Errorf("set MTU %d on %s: %w", mtu, VXLANDevice, err)
		}
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := r.h.LinkSetUp(l); err != nil {
			return 0, fmt.Errorf("set %s up: %w", VXLANDevice, err)
		}
	}
	res.VTEPMAC, res.VTEPMTU = mac, mtu
	return l.Attrs().Index, nil
}

// linkOf finds the link holding the address ip.
func (r *Routes) linkOf(ip net.IP) (netlink.Link, error) {
	addrs, err := r.h.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if a.IP.Equal(ip) {
			l, err := r.h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("link of %s: %w", ip, err)
			}
			return l, nil
		}
	}
	return nil, fmt.Errorf("VXLAN underlay: this node's InternalIP %s is on no link of the node", ip)
}

// reconcileNeighFDB makes the neighbour (gateway -> VTEP MAC) and FDB
// (VTEP MAC -> underlay address) entries of the device exactly those of
// the VXLAN routes. It returns how many entries it changed.
func (r *Routes) reconcileNeighFDB(idx int, routes []Route) (int, error) {
	neigh := map[string]Route{} // gateway -> route
	fdb := map[string]net.IP{}  // MAC -> underlay
	for _, rt := range routes {
		if !rt.VXLAN {
			continue
		}
		neigh[rt.Via.String()] = rt
		fdb[rt.MAC.String()] = rt.Underlay
	}
	changed := 0
	var errs []error
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		n, err := r.reconcileNeigh(idx, fam, neigh)
		changed += n
		errs = append(errs, err...)
	}
	n, err := r.reconcileFDB(idx, fdb)
	changed += n
	errs = append(errs, err...)
	return changed, errors.Join(errs...)
}

// reconcileNeigh makes the permanent neighbour entries of one family on
// the VXLAN device exactly the gateways' (gateway -> VTEP MAC).
func (r *Routes) reconcileNeigh(idx, fam int, neigh map[string]Route) (int, []error) {
	have, err := r.h.NeighList(idx, fam)
	if err != nil {
		return 0, []error{fmt.Errorf("list neighbours on %s: %w", VXLANDevice, err)}
	}
	changed := 0
	var errs []error
	ok := map[string]bool{}
	for _, n := range have {
		k := n.IP.String()
		want, wanted := neigh[k]
		switch {
		case wanted && n.State&netlink.NUD_PERMANENT != 0 && bytes.Equal(n.HardwareAddr, want.MAC):
			ok[k] = true
		case !wanted && n.State&netlink.NUD_PERMANENT != 0:
			// Kernel-made entries (multicast, failed lookups) come
			// and go by themselves; a permanent one is ours.
			if err := r.h.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete neighbour %s on %s: %w", k, VXLANDevice, err))
				continue
			}
			changed++
		}
	}
	for k, want := range neigh {
		if ok[k] || (fam == unix.AF_INET) != isV4(want.Via) {
			continue
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: fam, State: netlink.NUD_PERMANENT, IP: want.Via, HardwareAddr: want.MAC}
		if err := r.h.NeighSet(n); err != nil {
			errs = append(errs, fmt.Errorf("set neighbour %s lladdr %s on %s: %w", k, want.MAC, VXLANDevice, err))
			continue
		}
		changed++
	}
	return changed, errs
}

// reconcileFDB makes the device's FDB exactly one permanent entry per
// VTEP MAC, pointing at its node's underlay address.
func (r *Routes) reconcileFDB(idx int, fdb map[string]net.IP) (int, []error) {
	have, err := r.h.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return 0, []error{fmt.Errorf("list FDB of %s: %w", VXLANDevice, err)}
	}
	changed := 0
	var errs []error
	ok := map[string]bool{}
	for _, n := range have {
		if n.IP == nil {
			continue
		}
		k := n.HardwareAddr.String()
		if dst, wanted := fdb[k]; wanted && dst.Equal(n.IP) && !ok[k] && n.State&netlink.NUD_PERMANENT != 0 {
			ok[k] = true
			continue
		}
		if err := r.h.NeighDel(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			IP: n.IP, HardwareAddr: n.HardwareAddr}); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete FDB %s dst %s on %s: %w", k, n.IP, VXLANDevice, err))
			continue
		}
		changed++
	}
	macs := make([]string, 0, len(fdb))
	for k := range fdb {
		macs = append(macs, k)
	}
	slices.Sort(macs)
	for _, k := range macs {
		if ok[k] {
			continue
		}
		mac, _ := net.ParseMAC(k)
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			State: netlink.NUD_PERMANENT, IP: fdb[k], HardwareAddr: mac}
		if err := r.h.NeighAppend(n); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add FDB %s dst %s on %s: %w", k, fdb[k], VXLANDevice, err))
			continue
		}
		changed++
	}
	return changed, errs
}
