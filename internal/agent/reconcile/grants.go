package reconcile

import (
	"time"

	"github.com/qoscni/qoscni/internal/grant"
	"github.com/qoscni/qoscni/internal/paths"
)

// GrantGCGrace is how long a DRA grant's pod must be missing from the
// node's pods before the grant is removed. The kubelet prepares a claim
// (and the driver writes the grant) once the pod is bound to the node,
// which the agent's informer learns about at much the same time; the
// grace covers the informer being late, and a pod that is deleted has
// its claims unprepared by the kubelet anyway: this collects what a crash
// between the two left.
const GrantGCGrace = 2 * time.Minute

// gcGrants removes the grants of pods the node no longer has.
func (r *Reconciler) gcGrants(res *PassResult) {
	if r.cfg.StateRegistry == "" || r.cfg.Pods == nil || !r.cfg.Pods.Synced() {
		return
	}
	dir := paths.GrantDirOf(r.cfg.StateRegistry)
	pods, err := grant.Pods(dir)
	if err != nil {
		r.m.errors.WithLabelValues("gc").Inc()
		r.log.Error("list DRA grants", "err", err)
		res.Errors++
		return
	}
	if len(pods) == 0 {
		clear(r.grantGone)
		return
	}
	uids := r.cfg.Pods.UIDs()
	now := r.now()
	seen := map[string]bool{}
	for _, uid := range pods {
		seen[uid] = true
		if uids[uid] {
			delete(r.grantGone, uid)
			continue
		}
		first, ok := r.grantGone[uid]
		if !ok {
			r.grantGone[uid] = now
			continue
		}
		if now.Sub(first) < GrantGCGrace {
			continue
		}
		if err := grant.RemovePod(dir, uid); err != nil {
			r.m.errors.WithLabelValues("gc").Inc()
			r.log.Error("remove the DRA grants of a gone pod", "uid", uid, "err", err)
			res.Errors++
			continue
		}
		delete(r.grantGone, uid)
		res.GCed++
		r.log.Warn("removed the DRA grants of a pod the node no longer has", "uid", uid, "goneFor", now.Sub(first).Round(time.Second))
	}
	for uid := range r.grantGone {
		if !seen[uid] {
			delete(r.grantGone, uid)
		}
	}
}
