package netconf

import (
	"fmt"
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
}

// BandwidthEntry is the CNI "bandwidth" capability: rates in bit/s, bursts in bits.
type BandwidthEntry struct {
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
}

// PortMapping is one entry of the CNI "portMappings" capability.
type PortMapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"`
	HostIP        string `json:"hostIP,omitempty"`
}

func (r *RuntimeConfig) validate() error {
	for i := range r.PortMappings {
		pm := &r.PortMappings[i]
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
