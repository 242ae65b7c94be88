package reconcile

import (
	"maps"
	"slices"

	"github.com/qoscni/qoscni/internal/state"
)

// KernelRepairer is a node-wide drift repair step beyond shaping: state
// the records imply that the kernel can lose at once (an `nft flush
// ruleset`, a firewall reload) and that the plugin's next ADD would bring
// back only for its own pod. portmap (hostPort ruleset, elements, the
// localnet guard) and podnet (ipMasq) plug in here, so reconcile knows
// nothing of nftables or tc. Implementations work in the node namespace
// they were built for.
type KernelRepairer interface {
	// Name labels the step in logs.
	Name() string
	// Kinds are the qoscni_agent_repairs_total{kind} values Repair reports.
	Kinds() []string
	// Repair compares what the records need with the kernel (one
	// comparison, one batch per feature), restores the difference, and
	// returns how many objects of each kind it restored. live holds only
	// complete records of attachments that are not stale: what an ADD in
	// flight or a gone attachment holds is left to ADD, DEL and GC.
	// stateDirs are the state directories of every qoscni network the
	// pass read (per-network data beside them, such as portmap's localnet
	// markers, is found from them).
	Repair(live []*state.Record, stateDirs []string) (map[string]int, error)
}

// repairKernel runs the KernelRepairers after the pass's GC and shaping
// repair.
func (r *Reconciler) repairKernel(live []attachment, res *PassResult) {
	if len(r.cfg.Repairers) == 0 {
		return
	}
	complete := make([]*state.Record, 0, len(live))
	for _, rec := range live {
		// GC keeps a stale record whose cleanup failed: restoring what
		// that cleanup removed would undo it.
		if !rec.Provisional && !r.stale(rec.Record) {
			complete = append(complete, rec.Record)
		}
	}
	for _, k := range r.cfg.Repairers {
		for _, kind := range k.Kinds() {
			r.m.repairs.WithLabelValues(kind) // a series from the first pass on
		}
		fixed, err := k.Repair(complete, r.dirs)
		for _, kind := range slices.Sorted(maps.Keys(fixed)) {
			n := fixed[kind]
			if n <= 0 {
				continue
			}
			res.Repaired += n
			r.m.repairs.WithLabelValues(kind).Add(float64(n))
			r.log.Warn("repaired kernel state that drifted from the records", "step", k.Name(), "kind", kind, "count", n)
		}
		if err != nil {
			res.Errors++
			r.m.errors.WithLabelValues("repair").Inc()
			r.log.Error("repair", "step", k.Name(), "err", err)
		}
	}
}
