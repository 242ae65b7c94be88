package portmap

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

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

func invalid(field string, value any, why string) *types.Error {
	return netconf.InvalidField(field, value, why)
}

// Plan validates runtime portMappings and turns them into per-family
// Mappings for a pod with the given addresses. An entry without hostIP
// yields one Mapping per pod address family; an entry whose hostIP is of a
// family the pod has no address in is skipped, as the reference portmap
// plugin does. An unspecified hostIP ("0.0.0.0", "::") means every local
// address of that family. Nothing is changed on error: errors are CNI code
// 7 naming the entry.
func Plan(in []netconf.PortMapping, podIPs []net.IP) ([]Mapping, error) {
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
	type seenKey struct {
		v6       bool
		hostIP   string
		proto    string
		hostPort uint16
	}
	type seenVal struct {
		index int
		m     Mapping
	}
	seen := map[seenKey]seenVal{}
	var out []Mapping
	for i, pm := range in {
		field := fmt.Sprintf("runtimeConfig.portMappings[%d]", i)
		if pm.HostPort < 1 || pm.HostPort > 65535 {
			return nil, invalid(field+".hostPort", pm.HostPort, "must be 1-65535")
		}
		if pm.ContainerPort < 1 || pm.ContainerPort > 65535 {
			return nil, invalid(field+".containerPort", pm.ContainerPort, "must be 1-65535")
		}
		proto := strings.ToLower(pm.Protocol)
		if proto == "" {
			proto = "tcp"
		}
		if _, ok := protoNum(proto); !ok {
			return nil, invalid(field+".protocol", strconv.Quote(pm.Protocol), "must be tcp, udp or sctp")
		}
		var hostIP net.IP
		families := []net.IP{pod4, pod6}
		if s := strings.TrimSpace(pm.HostIP); s != "" {
			hostIP = net.ParseIP(s)
			if hostIP == nil {
				return nil, invalid(field+".hostIP", strconv.Quote(pm.HostIP), "not an IP address")
			}
			if v4 := hostIP.To4(); v4 != nil {
				hostIP, families = v4, []net.IP{pod4}
			} else {
				families = []net.IP{pod6}
			}
			if hostIP.IsUnspecified() {
				hostIP = nil
			}
		}
		for _, podIP := range families {
			if podIP == nil {
				continue
			}
			m := Mapping{
				HostPort:      uint16(pm.HostPort),
				ContainerPort: uint16(pm.ContainerPort),
				Protocol:      proto,
				HostIP:        hostIP,
				PodIP:         podIP,
			}
			k := seenKey{m.IPv6(), m.hostAddr(), proto, m.HostPort}
			if prev, dup := seen[k]; dup {
				if prev.m.ContainerPort == m.ContainerPort {
					continue
				}
				return nil, invalid(field, "hostPort "+m.String(),
					fmt.Sprintf("already mapped to containerPort %d by runtimeConfig.portMappings[%d]", prev.m.ContainerPort, prev.index))
			}
			seen[k] = seenVal{i, m}
			out = append(out, m)
		}
	}
	return out, nil
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
