package install

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"

	"github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/cni/teardown"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/tcdump"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

// IFBPattern matches the IFB devices qoscni creates (podnet.IFBName).
var IFBPattern = podnet.IFBNames

// hostVethPattern matches standalone mode's host veths (podnet.HostVethName).
var hostVethPattern = podnet.HostVethNames

// NftTable is qoscni's nftables table (family inet).
const NftTable = podnet.TableName

// cleanKernel removes qoscni's shaping, IFBs and nftables table from the
// node's namespace, and turns route_localnet off where qoscni turned it
// on. It keeps what gives a pod its connectivity (the veths,
// the bridge, addresses and routes). Order matters: a veth's redirect to
// an IFB goes before the IFB, or the veth's egress would be redirected to
// a device that no longer exists, which drops every packet of the pod.
func cleanKernel(_ context.Context, stateDirs []string, netnsPath string, rep *Report) error {
	k, err := openKernel(netnsPath)
	if err != nil {
		return err
	}
	defer k.close()
	var errs []error
	// 0. route_localnet, while its guards still stand: back to 0 where
	// qoscni turned it on, then the localnet guards (tc) go. The martian
	// chain goes with the table, last.
	errs = append(errs, k.localnet(stateDirs, rep)...)
	// 1. What the records say: also finds a chained veth shaped only
	// towards the pod (no IFB, no redirect to recognise it by).
	errs = append(errs, k.recordedShaping(stateDirs, rep)...)
	// 2. What the kernel has: every redirect of ours (a record may be
	// missing), then every IFB left; the node's bandwidth hierarchy the
	// same way.
	if err := k.leftoverShaping(rep); err != nil {
		errs = append(errs, err)
	}
	touched, err := k.sh.RemoveHierarchy()
	for _, l := range touched {
		rep.add("link "+l, Removed, "redirect to the node's bandwidth hierarchy")
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("remove the node's bandwidth hierarchy: %w", err))
	}
	// 3. The nftables table: masquerade and hostPorts of qoscni's pods.
	if err := deleteTable(k.fd, rep); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// kernel holds uninstall's handles on the node namespace.
type kernel struct {
	fd  int
	f   *os.File
	sh  *shaping.Shaper
	nl  *netlink.Handle
	tcc *tc.Tc
}

func openKernel(netnsPath string) (_ *kernel, err error) {
	k := &kernel{fd: -1}
	defer func() {
		if err != nil {
			k.close()
		}
	}()
	if netnsPath != "" {
		if k.f, err = os.Open(netnsPath); err != nil {
			return nil, fmt.Errorf("open netns %s: %w", netnsPath, err)
		}
		k.fd = int(k.f.Fd())
	}
	if k.sh, err = shaping.Open(k.fd); err != nil {
		return nil, err
	}
	tcCfg := &tc.Config{}
	if k.fd >= 0 {
		k.nl, err = netlink.NewHandleAt(netns.NsHandle(k.fd))
		tcCfg.NetNS = k.fd
	} else {
		k.nl, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	if k.tcc, err = tc.Open(tcCfg); err != nil {
		return nil, fmt.Errorf("open tc netlink: %w", err)
	}
	return k, nil
}

func (k *kernel) close() {
	if k.tcc != nil {
		k.tcc.Close()
	}
	if k.nl != nil {
		k.nl.Close()
	}
	if k.sh != nil {
		k.sh.Close()
	}
	if k.f != nil {
		k.f.Close()
	}
}

// localnet turns route_localnet off where the markers beside the state
// dirs say qoscni turned it on, and takes the localnet guards away.
func (k *kernel) localnet(stateDirs []string, rep *Report) []error {
	var localnet []string
	for _, d := range stateDirs {
		localnet = append(localnet, portmap.LocalnetDir(d))
	}
	undo, err := portmap.UninstallLocalnet(k.fd, localnet...)
	for _, u := range undo {
		sysctl := "sysctl net.ipv4.conf." + u.IfName + ".route_localnet"
		switch {
		case u.ResetRouteLocalnet:
			rep.add(sysctl, Restored, "0: qoscni had set it for 127.0.0.1:hostPort")
		case u.KeptRouteLocalnet:
			rep.add(sysctl, Unchanged, "1: it was 1 before qoscni")
		}
		if u.RemovedGuard {
			rep.add("link "+u.IfName, Removed, "localnet guard (tc ingress filter)")
		}
	}
	if err != nil {
		return []error{err}
	}
	return nil
}

// recordedShaping takes the shaping of every recorded attachment away;
// the pod keeps its veth, addresses and record.
func (k *kernel) recordedShaping(stateDirs []string, rep *Report) []error {
	var errs []error
	var recs []*state.Record
	for _, d := range stateDirs {
		rs, _, err := state.New(d).List("")
		if err != nil {
			errs = append(errs, err)
		}
		recs = append(recs, rs...)
	}
	for _, r := range recs {
		if r.HostVeth == "" {
			continue
		}
		only := teardown.Options{Order: []teardown.Step{teardown.Shaping}, NetnsFd: k.fd, Shaper: k.sh}
		if err := teardown.Run(r.Key(), r, only); err != nil {
			errs = append(errs, fmt.Errorf("pod %s/%s (%s): %w", r.Pod.Namespace, r.Pod.Name, r.HostVeth, err))
			continue
		}
		rep.add("link "+r.HostVeth, Removed, fmt.Sprintf("shaping of pod %s/%s", r.Pod.Namespace, r.Pod.Name))
	}
	return errs
}

// leftoverShaping finds what no record names: every redirect of ours to
// one of our IFBs, the shaping of standalone host veths, then the IFBs.
func (k *kernel) leftoverShaping(rep *Report) error {
	var errs []error
	links, err := k.nl.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	ifbs := map[uint32]string{}
	names := map[uint32]string{}
	for _, l := range links {
		names[uint32(l.Attrs().Index)] = l.Attrs().Name
		if l.Type() == "ifb" && IFBPattern.MatchString(l.Attrs().Name) {
			ifbs[uint32(l.Attrs().Index)] = l.Attrs().Name
		}
	}
	qdiscs, err := tcdump.QdiscsAt(k.fd)
	if err != nil {
		return err
	}
	ingressHook := core.BuildHandle(0xFFFF, tc.HandleMinIngress)
	for _, q := range qdiscs {
		if q.Kind != "clsact" || ifbs[q.Ifindex] != "" || names[q.Ifindex] == "" {
			continue
		}
		filters, err := k.tcc.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: q.Ifindex, Parent: ingressHook})
		if err != nil {
			errs = append(errs, fmt.Errorf("dump filters of %s: %w", names[q.Ifindex], err))
			continue
		}
		// Ours by qoscni's marker (or, from before it, a lone redirect to
		// one of our IFBs at the old priority); a clsact carrying only
		// others' filters, even redirects, is left alone, and Remove takes
		// only our filter off a shared one.
		idx, ours := shaping.OwnRedirect(filters, func(i uint32) bool { return ifbs[i] != "" })
		target := ifbs[idx]
		if !ours && !hostVethPattern.MatchString(names[q.Ifindex]) {
			continue
		}
		if err := k.sh.Remove(names[q.Ifindex], target); err != nil {
			errs = append(errs, err)
			continue
		}
		rep.add("link "+names[q.Ifindex], Removed, "shaping, redirect to "+orDefault(target, "none"))
	}
	// Standalone host veths shaped only towards the pod.
	for _, l := range links {
		if hostVethPattern.MatchString(l.Attrs().Name) {
			if err := k.sh.Remove(l.Attrs().Name, ""); err != nil {
				errs = append(errs, err)
			}
		}
	}
	left := make([]string, 0, len(ifbs))
	for _, n := range ifbs {
		left = append(left, n)
	}
	sort.Strings(left)
	for _, n := range left {
		l, err := k.nl.LinkByName(n)
		if err != nil {
			continue // removed above
		}
		if err := k.nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete IFB %s: %w", n, err))
			continue
		}
		rep.add("link "+n, Removed, "IFB")
	}
	return errors.Join(errs...)
}

func deleteTable(fd int, rep *Report) error {
	var opts []nftables.ConnOption
	if fd >= 0 {
		opts = append(opts, nftables.WithNetNSFd(fd))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	defer c.CloseLasting()
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("list nftables tables: %w", err)
	}
	what := "nftables table inet " + NftTable
	for _, t := range tables {
		if t.Name == NftTable {
			c.DelTable(t)
			if err := c.Flush(); err != nil {
				return fmt.Errorf("delete %s: %w", what, err)
			}
			rep.add(what, Removed, "")
			return nil
		}
	}
	rep.add(what, Absent, "")
	return nil
}
