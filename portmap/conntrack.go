package portmap

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// udpPortFilter matches UDP conntrack entries whose original destination is
// one of the mapped host ports (and the hostIP, when the mapping has one).
// Without the flush, a UDP flow that started before the mapping (or towards
// a pod that is gone) keeps its old translation until it idles out, which
// blackholes UDP services; the reference plugin flushes on ADD only.
type udpPortFilter struct {
	any   map[uint16]bool
	exact map[string]bool // hostIP|port
}

func exactKey(ip net.IP, port uint16) string { return fmt.Sprintf("%s|%d", ip, port) }

func (f *udpPortFilter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	if flow.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	p := flow.Forward.DstPort
	return f.any[p] || f.exact[exactKey(flow.Forward.DstIP, p)]
}

func (m *Manager) flushConntrack(maps []Mapping) error {
	filters := map[netlink.InetFamily]*udpPortFilter{}
	for _, mp := range maps {
		if mp.Protocol != "udp" {
			continue
		}
		fam := netlink.InetFamily(unix.AF_INET)
		if mp.IPv6() {
			fam = unix.AF_INET6
		}
		f := filters[fam]
		if f == nil {
			f = &udpPortFilter{any: map[uint16]bool{}, exact: map[string]bool{}}
			filters[fam] = f
		}
		if mp.HostIP == nil {
			f.any[mp.HostPort] = true
		} else {
			f.exact[exactKey(mp.HostIP, mp.HostPort)] = true
		}
	}
	if len(filters) == 0 {
		return nil
	}
	var h *netlink.Handle
	var err error
	if m.nsFd >= 0 {
		h, err = netlink.NewHandleAt(netns.NsHandle(m.nsFd), unix.NETLINK_NETFILTER)
	} else {
		h, err = netlink.NewHandle(unix.NETLINK_NETFILTER)
	}
	if err != nil {
		return fmt.Errorf("open conntrack netlink: %w", err)
	}
	defer h.Close()
	var errs []error
	for fam, f := range filters {
		if _, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, fam, f); err != nil {
			errs = append(errs, fmt.Errorf("flush UDP conntrack entries towards hostPorts: %w", err))
		}
	}
	return errors.Join(errs...)
}
