package netconf

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
)

// RuntimeConfig holds the capability arguments a runtime injects under
// "runtimeConfig". encoding/json matches object keys to these fields without
// regard to letter case, which is what we need: containerd sends Go field
// names ("IngressRate", "HostPort") while the CNI conventions document
// camelCase. The tests pin that behaviour.
type RuntimeConfig struct {
	Bandwidth      *BandwidthEntry   `json:"bandwidth,omitempty"`
	PortMappings   []PortMapping     `json:"portMappings,omitempty"`
	PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`

	// Ports are PortMappings as Parse accepted them: what portmap plans
	// the pod's mappings from.
	Ports []Port `json:"-"`
}

// BandwidthEntry is the CNI "bandwidth" capability: rates in bit/s, bursts in bits.
type BandwidthEntry struct {
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
}

// PortMapping is one entry of the CNI "portMappings" capability, as the
// runtime sends it.
type PortMapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"`
	HostIP        string `json:"hostIP,omitempty"`
}

// Port is a portMappings entry that passed every check: typed, protocol
// normalized, hostIP parsed, and the address families it maps in.
type Port struct {
	HostPort      uint16
	ContainerPort uint16
	Protocol      string // tcp, udp or sctp
	// HostIP is the one host address matched; nil is every local address
	// (no hostIP, or 0.0.0.0 / ::). IPv4 is in its 4-byte form.
	HostIP net.IP
	// V4 and V6 are the pod families the entry maps in: a hostIP names
	// one, and a family where an earlier entry already maps the same host
	// side to the same containerPort is left to that entry.
	V4, V6 bool
}

// Families are the address families of a pod, the only ones where two
// hostPort entries can clash.
type Families struct{ V4, V6 bool }

// BothFamilies is what a pod may have before its addresses are known.
var BothFamilies = Families{V4: true, V6: true}

// FamiliesOf returns the families of a pod's addresses.
func FamiliesOf(ips []net.IP) Families {
	var f Families
	for _, ip := range ips {
		if ip.To4() != nil {
			f.V4 = true
		} else if ip.To16() != nil {
			f.V6 = true
		}
	}
	return f
}

// ParsePortMappings decides which portMappings are valid, for a pod of the
// families fam: Parse's rules, for callers holding entries rather than a
// whole config. Errors are CNI code 7 naming the entry.
func ParsePortMappings(in []PortMapping, fam Families) ([]Port, error) {
	in = slices.Clone(in)
	if err := checkPortMappings(in); err != nil {
		return nil, err
	}
	return resolvePorts(in, fam)
}

func (r *RuntimeConfig) validate() error { return checkPortMappings(r.PortMappings) }

// checkPortMappings checks each entry's ports and protocol, and normalizes
// the protocol in place (lower case, tcp when absent).
func checkPortMappings(in []PortMapping) error {
	for i := range in {
		pm := &in[i]
		field := fmt.Sprintf("runtimeConfig.portMappings[%d]", i)
		if pm.HostPort < 1 || pm.HostPort > 65535 {
			return InvalidField(field+".hostPort", pm.HostPort, "must be 1-65535")
		}
		if pm.ContainerPort < 1 || pm.ContainerPort > 65535 {
			return InvalidField(field+".containerPort", pm.ContainerPort, "must be 1-65535")
		}
		pm.Protocol = strings.ToLower(pm.Protocol)
		switch pm.Protocol {
		case "":
			pm.Protocol = "tcp"
		case "tcp", "udp", "sctp":
		default:
			return InvalidField(field+".protocol", fmt.Sprintf("%q", pm.Protocol), "must be tcp, udp or sctp")
		}
	}
	return nil
}

// resolvePorts turns entries checkPortMappings accepted into Ports: it
// parses each hostIP and refuses an entry that maps a host side (family,
// address, protocol, port) an earlier entry maps to another containerPort.
// Only the families fam count: the reference portmap plugin skips an entry
// whose hostIP is of a family the pod has no address in.
func resolvePorts(in []PortMapping, fam Families) ([]Port, error) {
	type hostSide struct {
		v6    bool
		addr  string
		proto string
		port  uint16
	}
	type mapped struct {
		index         int
		containerPort uint16
	}
	seen := map[hostSide]mapped{}
	var out []Port
	for i, pm := range in {
		field := fmt.Sprintf("runtimeConfig.portMappings[%d]", i)
		p := Port{HostPort: uint16(pm.HostPort), ContainerPort: uint16(pm.ContainerPort), Protocol: pm.Protocol, V4: fam.V4, V6: fam.V6}
		if s := strings.TrimSpace(pm.HostIP); s != "" {
			ip := net.ParseIP(s)
			if ip == nil {
				return nil, InvalidField(field+".hostIP", strconv.Quote(pm.HostIP), "not an IP address")
			}
			if v4 := ip.To4(); v4 != nil {
				ip, p.V6 = v4, false
			} else {
				p.V4 = false
			}
			if !ip.IsUnspecified() {
				p.HostIP = ip
			}
		}
		for _, v6 := range []bool{false, true} {
			on := &p.V4
			if v6 {
				on = &p.V6
			}
			if !*on {
				continue
			}
			k := hostSide{v6, hostAddr(p.HostIP, v6), p.Protocol, p.HostPort}
			if prev, dup := seen[k]; dup {
				if prev.containerPort == p.ContainerPort {
					*on = false
					continue
				}
				return nil, InvalidField(field, fmt.Sprintf("hostPort %d/%s on %s", p.HostPort, p.Protocol, k.addr),
					fmt.Sprintf("already mapped to containerPort %d by runtimeConfig.portMappings[%d]", prev.containerPort, prev.index))
			}
			seen[k] = mapped{i, p.ContainerPort}
		}
		if p.V4 || p.V6 {
			out = append(out, p)
		}
	}
	return out, nil
}

// hostAddr names the host side's address as errors show it.
func hostAddr(ip net.IP, v6 bool) string {
	switch {
	case ip != nil:
		return ip.String()
	case v6:
		return "[::]"
	}
	return "0.0.0.0"
}
