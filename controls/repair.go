package controls

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/qoscni/qoscni/internal/state"
)

// RepairKind is what Repairer restores (qoscni_agent_repairs_total{kind}):
// one attachment's controls, set again after they drifted or went (an
// `nft flush ruleset`, an element deleted by hand).
const RepairKind = "controls"

// Repairer is the node agent's drift repair of the controls
// (reconcile.KernelRepairer).
type Repairer struct {
	nsFd int
	log  *slog.Logger
}

// NewRepairer works in the namespace nsFd (-1 = the current one).
func NewRepairer(nsFd int, log *slog.Logger) *Repairer {
	if log == nil {
		log = slog.Default()
	}
	return &Repairer{nsFd: nsFd, log: log}
}

// Name labels the step in logs.
func (r *Repairer) Name() string { return "controls" }

// Kinds are the repair kinds Repair reports.
func (r *Repairer) Kinds() []string { return []string{RepairKind} }

// Repair compares every live record's controls with the kernel and sets
// again those that differ. Records without controls cost nothing.
func (r *Repairer) Repair(live []*state.Record, _ []string) (map[string]int, error) {
	var m *Manager
	defer func() {
		if m != nil {
			m.Close()
		}
	}()
	fixed := 0
	var errs []error
	for _, rec := range live {
		if rec.Controls.Empty() {
			continue
		}
		if m == nil {
			var err error
			if m, err = New(r.nsFd); err != nil {
				return nil, err
			}
		}
		ips, err := IPsOf(rec)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		owner := OwnerOf(rec)
		drift := m.Check(owner, ips, rec.Controls)
		if drift == nil {
			continue
		}
		if err := m.Set(owner, ips, rec.Controls); err != nil {
			errs = append(errs, fmt.Errorf("restore controls of %s: %w", owner, err))
			continue
		}
		r.log.Info("restored controls", "namespace", rec.Pod.Namespace, "pod", rec.Pod.Name, "container", rec.ContainerID, "drift", drift.Error())
		fixed++
	}
	return map[string]int{RepairKind: fixed}, errors.Join(errs...)
}
