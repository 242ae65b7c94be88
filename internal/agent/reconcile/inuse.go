package reconcile

import (
	"errors"
	"fmt"
	"strings"

	"github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/tcdump"
)

// The hooks of clsact (and of the older ingress qdisc, which answers for
// its one hook under either) where a redirect to an IFB can sit.
var (
	ingressHook = core.BuildHandle(0xFFFF, tc.HandleMinIngress)
	egressHook  = core.BuildHandle(0xFFFF, tc.HandleMinEgress)
)

// inUseLinks returns the ifindexes of the links of unknown (qoscni-named,
// no record accounts for them) that something alive still uses, whatever
// the records say:
//   - a veth whose peer lives in another namespace: the namespace exists
//     (the kernel destroys the pair with it), so a pod is wired through
//     it. A veth whose peer is in the node namespace too is what an ADD
//     killed half way leaves.
//   - an IFB that a mirred action of a filter of another link targets,
//     unless that link is itself an unused leftover veth (it goes, and
//     the IFB with it, in the same passes).
//
// When the filters cannot be read, every unknown IFB counts as used.
func (r *Reconciler) inUseLinks(unknown []netlink.Link, res *PassResult) map[int]bool {
	used := map[int]bool{}
	deadVeths := map[int]bool{}
	var ifbs []netlink.Link
	for _, l := range unknown {
		a := l.Attrs()
		switch {
		case strings.HasPrefix(a.Name, "qi"):
			ifbs = append(ifbs, l)
		case l.Type() == "veth" && a.NetNsID >= 0:
			used[a.Index] = true
		default:
			deadVeths[a.Index] = true
		}
	}
	why := map[int]string{}
	for idx := range used {
		why[idx] = "its peer lives in another network namespace"
	}
	if len(ifbs) > 0 {
		targets, err := r.redirectTargets()
		if err != nil {
			res.Errors++
			r.m.errors.WithLabelValues("gc").Inc()
			r.log.Error("leftover IFBs not collected: cannot read the redirects that may target them", "err", err)
		}
		for _, l := range ifbs {
			idx := l.Attrs().Index
			if err != nil {
				used[idx] = true
				continue
			}
			for _, src := range targets[idx] {
				if !deadVeths[src] {
					used[idx], why[idx] = true, fmt.Sprintf("a redirect of ifindex %d targets it", src)
					break
				}
			}
		}
	}
	// Said once per link: a pod whose records the agent cannot find is
	// worth knowing about, not on every pass.
	seen := map[string]int{}
	for _, l := range unknown {
		a := l.Attrs()
		if !used[a.Index] {
			continue
		}
		seen[a.Name] = a.Index
		if r.inUse[a.Name] != a.Index && why[a.Index] != "" {
			r.log.Info("kept a link that no known state record accounts for: it is in use", "link", a.Name, "why", why[a.Index],
				"hint", "a qoscni network whose stateDir is neither in --cni-conf-dir nor registered")
		}
	}
	r.inUse = seen
	return used
}

// redirectTargets maps each ifindex that a mirred action (redirect or
// mirror) of the node's clsact or ingress filters targets to the links
// whose filters do.
func (r *Reconciler) redirectTargets() (map[int][]int, error) {
	qdiscs, err := tcdump.QdiscsAt(r.cfg.NetnsFd)
	if err != nil {
		return nil, err
	}
	targets := map[int][]int{}
	for _, q := range qdiscs {
		var hooks []uint32
		switch q.Kind {
		case "clsact":
			hooks = []uint32{ingressHook, egressHook}
		case "ingress":
			hooks = []uint32{ingressHook}
		default:
			continue
		}
		for _, hook := range hooks {
			filters, err := r.tc.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: q.Ifindex, Parent: hook})
			if errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) {
				continue // the link or its qdisc went since the dump
			}
			if err != nil {
				return nil, fmt.Errorf("dump filters of ifindex %d: %w", q.Ifindex, err)
			}
			for _, f := range filters {
				for _, a := range actionsOf(f.Attribute) {
					if a != nil && a.Kind == "mirred" && a.Mirred != nil && a.Mirred.Parms != nil {
						t := int(a.Mirred.Parms.IfIndex)
						targets[t] = append(targets[t], int(q.Ifindex))
					}
				}
			}
		}
	}
	return targets, nil
}

// actionsOf returns the actions of a filter of any classifier go-tc
// decodes: the main plugin of a chained setup may use any of them.
func actionsOf(a tc.Attribute) []*tc.Action {
	var out []*tc.Action
	add := func(acts *[]*tc.Action) {
		if acts != nil {
			out = append(out, *acts...)
		}
	}
	if a.U32 != nil {
		add(a.U32.Actions)
	}
	if a.Basic != nil {
		add(a.Basic.Actions)
	}
	if a.Flow != nil {
		add(a.Flow.Actions)
	}
	if a.Flower != nil {
		add(a.Flower.Actions)
	}
	if a.Fw != nil {
		add(a.Fw.Actions)
	}
	if a.Matchall != nil {
		add(a.Matchall.Actions)
	}
	if a.Route4 != nil {
		add(a.Route4.Actions)
	}
	if a.Rsvp != nil {
		add(a.Rsvp.Actions)
	}
	if a.TcIndex != nil {
		add(a.TcIndex.Actions)
	}
	if a.BPF != nil && a.BPF.Action != nil {
		out = append(out, a.BPF.Action)
	}
	if a.Cgroup != nil && a.Cgroup.Action != nil {
		out = append(out, a.Cgroup.Action)
	}
	return out
}
