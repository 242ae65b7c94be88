package portmap

import (
	"fmt"
	"net"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/state"
)

// Mapping is one hostPort translation for one address family: packets to
// HostIP (nil = every local address of that family) on HostPort/Protocol
// are DNATed to PodIP:ContainerPort.
type Mapping struct {
	HostPort      uint16
	ContainerPort uint16
	Protocol      string // tcp, udp or sctp
	HostIP        net.IP // nil = any local address
	PodIP         net.IP
}

// IPv6 reports whether the mapping is for the IPv6 family.
func (m Mapping) IPv6() bool { return m.PodIP.To4() == nil }

func (m Mapping) hostAddr() string {
	if m.HostIP != nil {
		return m.HostIP.String()
	}
	if m.IPv6() {
		return "[::]"
	}
	return "0.0.0.0"
}

// String names the host side of the mapping, as errors show it:
// "8080/tcp on 0.0.0.0".
func (m Mapping) String() string {
	return fmt.Sprintf("%d/%s on %s", m.HostPort, m.Protocol, m.hostAddr())
}

// protoNum is the IP protocol number the kernel matches (meta l4proto).
func protoNum(p string) (byte, bool) {
	switch p {
	case "tcp":
		return 6, true
	case "udp":
		return 17, true
	case "sctp":
		return 132, true
	}
	return 0, false
}

// Plan turns the portMappings netconf accepted into per-family Mappings
// for a pod with the given addresses: one per entry and family it maps in
// (netconf.Port.V4, V6) that the pod has an address of, to the pod's first
// address of that family. netconf decided what is valid, including that
// no two entries map one host side to different containerPorts.
func Plan(in []netconf.Port, podIPs []net.IP) []Mapping {
	var pod4, pod6 net.IP
	for _, ip := range podIPs {
		if v4 := ip.To4(); v4 != nil {
			if pod4 == nil {
				pod4 = v4
			}
		} else if ip.To16() != nil && pod6 == nil {
			pod6 = ip.To16()
		}
	}
	var out []Mapping
	for _, p := range in {
		for _, fam := range [...]struct {
			on    bool
			podIP net.IP
		}{{p.V4, pod4}, {p.V6, pod6}} {
			if !fam.on || fam.podIP == nil {
				continue
			}
			out = append(out, Mapping{HostPort: p.HostPort, ContainerPort: p.ContainerPort, Protocol: p.Protocol, HostIP: p.HostIP, PodIP: fam.podIP})
		}
	}
	return out
}

// ToState converts mappings to the attachment record's form.
func ToState(maps []Mapping) []state.Port {
	out := make([]state.Port, 0, len(maps))
	for _, m := range maps {
		p := state.Port{
			HostPort:      int(m.HostPort),
			ContainerPort: int(m.ContainerPort),
			Protocol:      m.Protocol,
			PodIP:         m.PodIP.String(),
		}
		if m.HostIP != nil {
			p.HostIP = m.HostIP.String()
		}
		out = append(out, p)
	}
	return out
}

// FromState converts an attachment record's ports back to mappings, so DEL
// works when the runtime sends no portMappings.
func FromState(ports []state.Port) ([]Mapping, error) {
	out := make([]Mapping, 0, len(ports))
	for i, p := range ports {
		if p.HostPort < 1 || p.HostPort > 65535 || p.ContainerPort < 1 || p.ContainerPort > 65535 {
			return nil, fmt.Errorf("state port %d: ports %d->%d out of range", i, p.HostPort, p.ContainerPort)
		}
		if _, ok := protoNum(p.Protocol); !ok {
			return nil, fmt.Errorf("state port %d: unknown protocol %q", i, p.Protocol)
		}
		podIP := net.ParseIP(p.PodIP)
		if podIP == nil {
			return nil, fmt.Errorf("state port %d: bad podIP %q", i, p.PodIP)
		}
		if v4 := podIP.To4(); v4 != nil {
			podIP = v4
		}
		m := Mapping{HostPort: uint16(p.HostPort), ContainerPort: uint16(p.ContainerPort), Protocol: p.Protocol, PodIP: podIP}
		if p.HostIP != "" {
			h := net.ParseIP(p.HostIP)
			if h == nil {
				return nil, fmt.Errorf("state port %d: bad hostIP %q", i, p.HostIP)
			}
			if v4 := h.To4(); v4 != nil {
				h = v4
			}
			if (h.To4() == nil) != m.IPv6() {
				return nil, fmt.Errorf("state port %d: hostIP %s and podIP %s differ in family", i, h, podIP)
			}
			m.HostIP = h
		}
		out = append(out, m)
	}
	return out, nil
}
