package plugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// Check compares what ADD made with the kernel, the IPAM store and the
// state record, and reports every difference.
func (p *Plugin) Check(args *skel.CmdArgs, conf *netconf.NetConf, _ netconf.PodArgs) error {
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "invalid prevResult: CHECK needs the result of ADD in prevResult", "")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
	}
	store := state.New(conf.StateDir)
	key := state.Key{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName}
	rec, err := store.Load(key)
	if err != nil {
		return err
	}
	if rec == nil {
		return types.NewError(types.ErrUnknownContainer,
			fmt.Sprintf("unknown attachment %s/%s in network %s: no state record", args.ContainerID, args.IfName, conf.Name), "")
	}
	if rec.Provisional {
		return types.NewError(types.ErrUnknownContainer,
			fmt.Sprintf("attachment %s/%s in network %s: its ADD did not finish (DEL it)", args.ContainerID, args.IfName, conf.Name), "")
	}
	var errs []error
	if rec.Mode != state.ModeChained {
		if err := p.checkStandalone(args, conf, prev, rec); err != nil {
			errs = append(errs, err)
		}
	}
	if err := checkShaping(rec); err != nil {
		errs = append(errs, err)
	}
	if err := checkPorts(rec, localnetIface(prev, rec)); err != nil {
		errs = append(errs, err)
	}
	if err := checkControls(rec); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// localnetIface is the interface ADD gave route_localnet and its guard:
// the bridge, or in chained mode what routeLocalnetIface picks.
func localnetIface(prev *current.Result, rec *state.Record) string {
	if rec.Mode != state.ModeChained {
		return rec.Bridge
	}
	host, err := hostHandle()
	if err != nil {
		return ""
	}
	defer host.Close()
	return routeLocalnetIface(host, prev, rec.HostVeth)
}

// checkShaping compares the record's shaping with the kernel, read-only.
func checkShaping(rec *state.Record) error {
	sh, err := shaping.Open(-1)
	if err != nil {
		return err
	}
	defer sh.Close()
	diff, err := sh.Diff(shaping.FromRecord(rec, podnet.IFBName(rec.ContainerID, rec.IfName)))
	if err != nil {
		return fmt.Errorf("check shaping of %s/%s: %w", rec.ContainerID, rec.IfName, err)
	}
	if rec.Shaping != nil && rec.Shaping.Guarantee != nil {
		hd, err := checkHierarchy(sh, rec)
		if err != nil {
			return fmt.Errorf("check shaping of %s/%s: %w", rec.ContainerID, rec.IfName, err)
		}
		diff = append(diff, hd...)
	}
	if len(diff) > 0 {
		return fmt.Errorf("shaping of %s/%s differs from its record: %s", rec.ContainerID, rec.IfName, strings.Join(diff, "; "))
	}
	return nil
}

// checkHierarchy compares the attachment's place in the node hierarchy
// (classes, address entries, redirects) with its record.
func checkHierarchy(sh *shaping.Shaper, rec *state.Record) ([]string, error) {
	states, err := sh.ReadHierarchies(true)
	if err != nil {
		return nil, err
	}
	g, minor := shaping.GuaranteeFromRecord(rec.Shaping.Guarantee)
	return sh.DiffMember(g, minor, rec.HostVeth, rec.Addrs(), states)
}

func (p *Plugin) checkStandalone(args *skel.CmdArgs, conf *netconf.NetConf, prev *current.Result, rec *state.Record) error {
	netns, err := podnet.OpenNetNS(args.Netns)
	if err != nil {
		return err
	}
	defer netns.Close()
	host, err := hostHandle()
	if err != nil {
		return err
	}
	defer host.Close()
	podH, err := netlink.NewHandleAt(netns.Handle)
	if err != nil {
		return fmt.Errorf("open netlink in %s: %w", args.Netns, err)
	}
	defer podH.Close()

	var ipcs []*current.IPConfig
	for _, ipc := range prev.IPs {
		if ipc.Interface == nil || *ipc.Interface < 0 || *ipc.Interface >= len(prev.Interfaces) ||
			prev.Interfaces[*ipc.Interface].Name == args.IfName {
			ipcs = append(ipcs, ipc)
		}
	}
	var routes []*types.Route
	routes = append(routes, prev.Routes...)
	// prevResult already contains the default routes ADD added.
	c := *conf
	c.IsDefaultGateway = false
	want := planPod(&c, args.IfName, rec.MTU, ipcs, routes)
	want.HostVeth = rec.HostVeth
	if !conf.IsGateway {
		want.Gateways = nil
	}
	var errs []error
	if err := podnet.Verify(host, netns, podH, want); err != nil {
		errs = append(errs, err)
	}

	src, err := newAddrSource(conf)
	if err != nil {
		return err
	}
	if src.alloc != nil {
		held, err := src.Get(args.ContainerID, args.IfName)
		if err != nil {
			errs = append(errs, err)
		} else if !sameIPs(held, ipsOf(want.Pod.Addrs)) {
			errs = append(errs, fmt.Errorf("IPAM holds %v for %s/%s, prevResult says %v", held, args.ContainerID, args.IfName, ipsOf(want.Pod.Addrs)))
		}
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), delegateTimeout)
		defer cancel()
		if err := ignoreOut(delegate(ctx, "CHECK", conf.IPAM.Type, conf.Raw)); err != nil {
			errs = append(errs, fmt.Errorf("ipam plugin %s CHECK: %w", conf.IPAM.Type, err))
		}
	}
	if conf.IPMasq {
		m, err := podnet.NewMasq(-1)
		if err != nil {
			return err
		}
		for _, ip := range ipsOf(want.Pod.Addrs) {
			ok, err := m.Has(ip)
			if err != nil {
				errs = append(errs, err)
			} else if !ok {
				errs = append(errs, fmt.Errorf("ipMasq element for %s missing from nftables table %s", ip, podnet.TableName))
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("check %s/%s: %w", args.ContainerID, args.IfName, errors.Join(errs...))
	}
	return nil
}

func sameIPs(a, b []net.IP) bool {
	if len(a) != len(b) {
		return false
	}
	as := make([]string, len(a))
	bs := make([]string, len(b))
	for i := range a {
		as[i], bs[i] = a[i].String(), b[i].String()
	}
	sort.Strings(as)
	sort.Strings(bs)
	for i := range as {
		if as[i] != bs[i] {
			return false
		}
	}
	return true
}
