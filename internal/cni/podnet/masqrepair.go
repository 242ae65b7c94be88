package podnet

import (
	"fmt"
	"log/slog"
	"net"

	"github.com/qoscni/qoscni/internal/state"
)

// Kinds of what MasqRepairer restores (qoscni_agent_repairs_total{kind}).
const (
	// RepairBase: the masquerade chain, its rules and sets were rebuilt.
	RepairBase = "nftables-base"
	// RepairMasquerade: a masq-src or masq-skip-dst element was restored.
	RepairMasquerade = "masquerade"
)

// MasqRepairer is the node agent's drift repair of ipMasq
// (reconcile.KernelRepairer): after an `nft flush ruleset` or a lost
// element, every complete standalone record with ipMasq gets its
// addresses and subnets back. Removing what no record holds is left to
// DEL and the GC of stale attachments.
type MasqRepairer struct {
	nsFd int
	log  *slog.Logger
}

// NewMasqRepairer works in the namespace nsFd (-1 = the current one).
func NewMasqRepairer(nsFd int, log *slog.Logger) *MasqRepairer {
	if log == nil {
		log = slog.Default()
	}
	return &MasqRepairer{nsFd: nsFd, log: log}
}

// Name labels the step in logs.
func (r *MasqRepairer) Name() string { return "masquerade" }

// Kinds are the repair kinds Repair reports.
func (r *MasqRepairer) Kinds() []string { return []string{RepairBase, RepairMasquerade} }

// Repair restores the masquerade elements of live (complete records only).
func (r *MasqRepairer) Repair(live []*state.Record, _ []string) (map[string]int, error) {
	var addrs []net.IPNet
	pods := 0
	for _, rec := range live {
		if !rec.IPMasq || rec.Provisional || rec.Mode == state.ModeChained {
			continue
		}
		pods++
		for _, c := range rec.IPs {
			ip, n, err := net.ParseCIDR(c)
			if err != nil {
				return nil, fmt.Errorf("address %q of %s/%s: %w", c, rec.ContainerID, rec.IfName, err)
			}
			addrs = append(addrs, net.IPNet{IP: ip, Mask: n.Mask})
		}
	}
	if len(addrs) == 0 {
		return nil, nil
	}
	m, err := NewMasq(r.nsFd)
	if err != nil {
		return nil, err
	}
	base, added, err := m.Repair(addrs)
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	if base {
		out[RepairBase] = 1
		r.log.Warn("restored the ipMasq chain of table inet "+TableName, "attachments", pods)
	}
	if added > 0 {
		out[RepairMasquerade] = added
		r.log.Warn("restored ipMasq elements from the state records", "elements", added, "attachments", pods)
	}
	return out, nil
}
