// Package nodenet connects the pods of different nodes in standalone mode,
// where qoscni is the cluster's only CNI: the agent watches the Node
// objects and installs, for every other node, a route to that node's pod
// CIDRs (spec.podCIDRs), and tells ipMasq to leave pod-to-pod traffic
// between nodes unmasqueraded.
//
// The kernel side is a reconciler (desired routes computed from the peers
// as data, compared with the routes qoscni owns, only the difference
// changed). Routes qoscni owns carry the routing protocol RouteProtocol;
// every other route is foreign and never touched.
//
// Backends: host-gw (a route via the peer's InternalIP, which must be
// on-link) and VXLAN (vxlan.go: a qoscni-owned kernel VXLAN device, with
// routes, neighbour and FDB entries programmed from the Node objects).
// Mode auto takes VXLAN for exactly the pod CIDRs host-gw cannot serve
// because the peer is behind a router (ReasonNotOnLink); mode vxlan takes
// it for all peers.
package nodenet

import (
	"bytes"
	"fmt"
	"net"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Peer is what routing needs of a Node.
type Peer struct {
	Name        string
	InternalIPs []net.IP
	PodCIDRs    []*net.IPNet
	// VTEPMAC is the MAC of the peer's VXLAN device (annotation
	// VTEPMACAnnotation); nil when the peer publishes none.
	VTEPMAC net.HardwareAddr
}

// PeerFromNode reads the InternalIP addresses (status.addresses) and the
// pod CIDRs (spec.podCIDRs, else the older single spec.podCIDR) of a node.
// Unparsable values are left out: a node the API server accepted with a
// bad field must not stop the routes to every other node.
func PeerFromNode(n *corev1.Node) Peer {
	p := Peer{Name: n.Name}
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip := net.ParseIP(strings.TrimSpace(a.Address)); ip != nil && !slices.ContainsFunc(p.InternalIPs, ip.Equal) {
			p.InternalIPs = append(p.InternalIPs, normIP(ip))
		}
	}
	if s, ok := n.Annotations[VTEPMACAnnotation]; ok {
		if mac, err := net.ParseMAC(strings.TrimSpace(s)); err == nil && len(mac) == 6 {
			p.VTEPMAC = mac
		}
	}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		_, ipn, err := net.ParseCIDR(strings.TrimSpace(c))
		if err != nil {
			continue
		}
		ipn.IP = normIP(ipn.IP)
		if len(ipn.IP) == net.IPv4len && len(ipn.Mask) == net.IPv6len {
			ipn.Mask = ipn.Mask[12:]
		}
		p.PodCIDRs = append(p.PodCIDRs, ipn)
	}
	return p
}

// normIP is the 4-byte form of an IPv4 address, else the 16-byte form.
func normIP(ip net.IP) net.IP {
	if v4 := ip.To4(); v4 != nil {
		return v4
	}
	return ip.To16()
}

func isV4(ip net.IP) bool { return ip.To4() != nil }

func familyName(v4 bool) string {
	if v4 {
		return "IPv4"
	}
	return "IPv6"
}

// Equal says whether two peers would give the same routes.
func (p Peer) Equal(o Peer) bool {
	return p.Name == o.Name &&
		slices.EqualFunc(p.InternalIPs, o.InternalIPs, net.IP.Equal) &&
		slices.EqualFunc(p.PodCIDRs, o.PodCIDRs, func(a, b *net.IPNet) bool { return a.String() == b.String() }) &&
		bytes.Equal(p.VTEPMAC, o.VTEPMAC)
}

func (p Peer) String() string {
	s := fmt.Sprintf("%s ips=%v podCIDRs=%v", p.Name, p.InternalIPs, p.PodCIDRs)
	if p.VTEPMAC != nil {
		s += " vtep=" + p.VTEPMAC.String()
	}
	return s
}

// ClusterCIDRs are the pod CIDRs of all peers (this node included): the
// destinations ipMasq must leave alone.
func ClusterCIDRs(peers []Peer) []net.IPNet {
	var out []net.IPNet
	for _, p := range peers {
		for _, c := range p.PodCIDRs {
			out = append(out, *c)
		}
	}
	return out
}
