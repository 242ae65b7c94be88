package plugin

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/netpolnft"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

// Add wires the pod (standalone) and records the attachment.
func (p *Plugin) Add(args *skel.CmdArgs, conf *netconf.NetConf, pod netconf.PodArgs) error {
	if conf.Chained() {
		return p.addChained(args, conf, pod)
	}
	res, err := p.addStandalone(args, conf, pod)
	if err != nil {
		return err
	}
	return types.PrintResult(res, conf.CNIVersion)
}

// standaloneAdd is one standalone ADD: what its steps share. Each step
// changes the kernel or the disk, pushes its undo, and marks its end (the
// reliability tests kill the plugin at each mark, internal/fault).
type standaloneAdd struct {
	p        *Plugin
	args     *skel.CmdArgs
	conf     *netconf.NetConf
	pod      netconf.PodArgs
	st       *steps
	store    *state.Store
	key      state.Key
	rollback undo

	netns      *podnet.NetNS
	host, podH *netlink.Handle
	mtu        int
	shape      shaping.Plan
	guarantee  shaping.Guarantee
	minor      uint16
	ports      []portmap.Mapping
	controls   *state.Controls
	hostName   string
	ifb        string
}

func (p *Plugin) addStandalone(args *skel.CmdArgs, conf *netconf.NetConf, pod netconf.PodArgs) (_ *current.Result, err error) {
	a := &standaloneAdd{p: p, args: args, conf: conf, pod: pod, st: p.steps("ADD"), store: state.New(conf.StateDir),
		key:      state.Key{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName},
		hostName: podnet.HostVethName(args.ContainerID, args.IfName), ifb: podnet.IFBName(args.ContainerID, args.IfName)}
	defer a.st.done()
	if err := a.finishUnfinished(); err != nil {
		return nil, err
	}
	defer a.close()
	if err := a.open(); err != nil {
		return nil, err
	}
	if err := a.plan(); err != nil {
		return nil, err
	}
	if err := p.bridgeNetfilter(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			a.rollback.run(p.Log)
		}
	}()
	src, err := newAddrSource(conf)
	if err != nil {
		return nil, err
	}
	if err := a.provisional(); err != nil {
		return nil, err
	}
	ipcs, ipamRoutes, dns, err := src.allocate(args.ContainerID, args.IfName)
	if err != nil {
		return nil, err
	}
	a.rollback.push(func() error { return src.release(args.ContainerID, args.IfName) })
	a.st.mark("ipam")
	if conf.EnforcesPolicy() {
		if err := a.pend(ipcs); err != nil {
			return nil, err
		}
	}
	br, veth, err := a.wire()
	if err != nil {
		return nil, err
	}
	want := planPod(conf, args.IfName, a.mtu, ipcs, ipamRoutes)
	if err := a.configurePod(br, veth, want); err != nil {
		return nil, err
	}
	if err := a.shapeAndMap(want); err != nil {
		return nil, err
	}
	rec, err := a.save(veth, want)
	if err != nil {
		return nil, err
	}
	return a.result(br, veth, rec, want, dns)
}

// finishUnfinished refuses an attachment that exists, and tears down what
// an earlier ADD of it left when that ADD was killed half way and no DEL
// came (its provisional record).
func (a *standaloneAdd) finishUnfinished() error {
	rec, lerr := a.store.Load(a.key)
	if lerr != nil || rec == nil {
		return nil
	}
	if !rec.Provisional {
		return types.NewError(ErrAttachmentExists,
			fmt.Sprintf("attachment %s/%s already exists in network %s (DEL it first)", a.args.ContainerID, a.args.IfName, a.conf.Name), "")
	}
	src, err := newAddrSource(a.conf)
	if err != nil {
		return err
	}
	if err := a.p.teardown(a.conf, src, a.store, a.key, rec, true); err != nil {
		return fmt.Errorf("remove what an unfinished ADD of %s/%s left: %w", a.args.ContainerID, a.args.IfName, err)
	}
	return nil
}

// open opens the pod's netns and the netlink handles of both namespaces,
// and refuses a pod interface name already in use.
func (a *standaloneAdd) open() error {
	netns, err := podnet.OpenNetNS(a.args.Netns)
	if err != nil {
		return err
	}
	a.netns = netns
	if a.host, err = hostHandle(); err != nil {
		return err
	}
	if a.podH, err = netlink.NewHandleAt(netns.Handle); err != nil {
		return fmt.Errorf("open netlink in %s: %w", a.args.Netns, err)
	}
	a.st.mark("open")
	if exists, err := podnet.LinkExists(a.podH, a.args.IfName); err != nil {
		return err
	} else if exists {
		return podnet.ErrIfExists(a.args.IfName, a.args.Netns)
	}
	return nil
}

func (a *standaloneAdd) close() {
	if a.podH != nil {
		a.podH.Close()
	}
	if a.host != nil {
		a.host.Close()
	}
	if a.netns != nil {
		a.netns.Close()
	}
}

// plan decides the MTU and the shaping before anything changes, so bad
// input is refused with nothing done.
func (a *standaloneAdd) plan() error {
	a.mtu = a.conf.MTU
	if a.mtu == 0 {
		a.mtu = podnet.DefaultMTU(a.host)
	}
	shape, g, err := a.p.shapingPlan(a.conf, a.pod, a.mtu)
	if err != nil {
		return err
	}
	a.shape, a.guarantee = shape, g
	logClamps(a.p.Log, a.args.ContainerID, a.args.IfName, shape)
	a.controls, err = planControls(a.conf)
	return err
}

// provisional writes, before the first change, a record saying this ADD
// is under way, so that DEL, GC and the agent find what it made if it is
// killed before the full record replaces this one.
func (a *standaloneAdd) provisional() error {
	a.p.registerStateDir(a.conf.StateDir)
	if err := a.store.SaveProvisional(&state.Record{
		Network: a.conf.Name, ContainerID: a.args.ContainerID, IfName: a.args.IfName, Netns: a.args.Netns,
		Pod:  state.Pod{Namespace: a.pod.Namespace, Name: a.pod.Name, UID: a.pod.UID},
		Mode: state.ModeStandalone, Bridge: a.conf.Bridge, HostVeth: a.hostName, IPMasq: a.conf.IPMasq,
		Created: time.Now().UTC(),
	}); err != nil {
		return err
	}
	a.rollback.push(func() error { return a.store.Delete(a.key) })
	a.st.mark("provisional")
	return nil
}

// wire makes the bridge and the veth pair, the host end on the bridge.
func (a *standaloneAdd) wire() (netlink.Link, *podnet.Veth, error) {
	br, err := podnet.EnsureBridge(a.host, podnet.BridgeConfig{Name: a.conf.Bridge, MTU: a.mtu, Promisc: a.conf.PromiscMode})
	if err != nil {
		return nil, nil, err
	}
	a.st.mark("bridge")
	// A host veth under our deterministic name with no state record is what
	// an ADD killed half way leaves behind; the runtime has already given up
	// on it, so it is replaced.
	if err := podnet.DeleteLink(a.host, a.hostName); err != nil {
		return nil, nil, err
	}
	veth, err := podnet.CreateVeth(a.host, a.netns, a.podH, a.hostName, a.args.IfName, a.mtu)
	if err != nil {
		return nil, nil, err
	}
	a.rollback.push(func() error { return podnet.DeleteLink(a.host, a.hostName) })
	a.st.mark("veth-created")
	if err := podnet.AttachHost(a.host, veth.Host, br, a.conf.HairpinMode); err != nil {
		return nil, nil, err
	}
	a.st.mark("veth")
	return br, veth, nil
}

// configurePod puts the addresses and routes in the pod, the gateways on
// the bridge, and turns on what forwarding needs.
func (a *standaloneAdd) configurePod(br netlink.Link, veth *podnet.Veth, want podnet.Expected) error {
	if err := podnet.ConfigurePod(a.netns, a.podH, veth.Pod, want.Pod); err != nil {
		return err
	}
	var v4, v6 bool
	for _, gw := range want.Gateways {
		if err := podnet.EnsureGatewayAddr(a.host, br, gw.IP, gw.Mask); err != nil {
			return err
		}
		v4 = v4 || gw.IP.To4() != nil
		v6 = v6 || gw.IP.To4() == nil
	}
	a.st.mark("pod")
	if err := podnet.EnableForwarding(v4, v6); err != nil {
		return err
	}
	a.st.mark("sysctl")
	return nil
}

// shapeAndMap applies the shaping, the masquerade and the hostPorts.
func (a *standaloneAdd) shapeAndMap(want podnet.Expected) error {
	if !a.shape.Empty() {
		sh, err := shaping.Open(-1)
		if err != nil {
			return err
		}
		defer sh.Close()
		a.rollback.push(func() error { return podnet.DeleteLink(a.host, a.ifb) })
		if err := sh.ApplyFresh(shaping.Desired{HostVeth: a.hostName, IFB: a.ifb, MTU: a.mtu, Plan: a.shape}); err != nil {
			return fmt.Errorf("shape %s/%s: %w", a.args.ContainerID, a.args.IfName, err)
		}
	}
	if !a.guarantee.Empty() {
		minor, undo, err := a.p.joinHierarchy(a.guarantee, a.conf.Capacity, a.hostName, ipsOf(want.Pod.Addrs))
		if err != nil {
			return err
		}
		a.minor = minor
		a.rollback.push(undo)
	}
	a.st.mark("shaping")
	if a.conf.IPMasq {
		m, err := podnet.NewMasq(-1)
		if err != nil {
			return err
		}
		var nets []net.IPNet
		for _, ad := range want.Pod.Addrs {
			nets = append(nets, ad.IPNet)
		}
		if err := m.Add(nets); err != nil {
			return err
		}
		a.rollback.push(func() error { return m.Del(ipsOf(want.Pod.Addrs)) })
	}
	a.st.mark("masq")
	a.ports = planPorts(a.conf, ipsOf(want.Pod.Addrs))
	if len(a.ports) > 0 {
		undoPorts, err := addPorts(portOwner(a.key, a.pod), a.conf.StateDir, a.conf.Bridge, a.ports)
		if err != nil {
			return err
		}
		a.rollback.push(undoPorts)
	}
	a.st.mark("ports")
	if !a.controls.Empty() {
		undo, err := addControls(portOwner(a.key, a.pod), ipsOf(want.Pod.Addrs), a.controls)
		if err != nil {
			return err
		}
		a.rollback.push(undo)
	}
	a.st.mark("controls")
	return nil
}

// save replaces the provisional record with the full one.
func (a *standaloneAdd) save(veth *podnet.Veth, want podnet.Expected) (*state.Record, error) {
	rec := &state.Record{
		Network:         a.conf.Name,
		ContainerID:     a.args.ContainerID,
		IfName:          a.args.IfName,
		Netns:           a.args.Netns,
		Pod:             state.Pod{Namespace: a.pod.Namespace, Name: a.pod.Name, UID: a.pod.UID},
		Mode:            state.ModeStandalone,
		Bridge:          a.conf.Bridge,
		HostVeth:        a.hostName,
		PodMAC:          veth.Pod.Attrs().HardwareAddr.String(),
		MTU:             a.mtu,
		IPMasq:          a.conf.IPMasq,
		Shaping:         shaping.RecordOf(a.shape, a.guarantee, a.minor, a.hostName, a.ifb),
		ShapingDefaults: shapingDefaults(a.conf),
		Ports:           portmap.ToState(a.ports),
		Controls:        a.controls,
		Created:         time.Now().UTC(),
	}
	for _, ad := range want.Pod.Addrs {
		rec.IPs = append(rec.IPs, ad.IPNet.String())
		if ad.Gateway != nil {
			rec.Gateways = append(rec.Gateways, ad.Gateway.String())
		}
	}
	if err := a.store.Save(rec); err != nil {
		return nil, err
	}
	a.st.mark("state")
	return rec, nil
}

// result is the CNI result: bridge, host veth, pod interface (and IFB),
// the addresses, routes and DNS.
func (a *standaloneAdd) result(br netlink.Link, veth *podnet.Veth, rec *state.Record, want podnet.Expected, dns *types.DNS) (*current.Result, error) {
	// Refreshed for the MACs the kernel assigned.
	hostLink, err := a.host.LinkByIndex(veth.Host.Attrs().Index)
	if err != nil {
		return nil, fmt.Errorf("look up %s: %w", a.hostName, err)
	}
	brLink, err := a.host.LinkByIndex(br.Attrs().Index)
	if err != nil {
		return nil, fmt.Errorf("look up bridge %s: %w", a.conf.Bridge, err)
	}
	res := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: a.conf.Bridge, Mac: brLink.Attrs().HardwareAddr.String()},
			{Name: a.hostName, Mac: hostLink.Attrs().HardwareAddr.String()},
			{Name: a.args.IfName, Mac: rec.PodMAC, Sandbox: a.args.Netns, Mtu: a.mtu},
		},
	}
	if a.shape.Egress != nil {
		res.Interfaces = appendIFB(a.host, res.Interfaces, a.ifb)
	}
	for _, ad := range want.Pod.Addrs {
		res.IPs = append(res.IPs, &current.IPConfig{
			Interface: current.Int(2),
			Address:   ad.IPNet,
			Gateway:   ad.Gateway,
		})
	}
	for _, r := range want.Pod.Routes {
		res.Routes = append(res.Routes, &types.Route{Dst: r.Dst, GW: r.GW})
	}
	res.DNS = a.conf.DNS
	if dns != nil && !dns.IsEmpty() && a.conf.DNS.IsEmpty() {
		res.DNS = *dns
	}
	return res, nil
}

func ipsOf(addrs []podnet.Addr) []net.IP {
	out := make([]net.IP, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, a.IPNet.IP)
	}
	return out
}

// planPod turns IPAM output and the config into the pod's addresses,
// routes and the gateways the bridge carries.
func planPod(conf *netconf.NetConf, ifName string, mtu int, ipcs []*current.IPConfig, routes []*types.Route) podnet.Expected {
	want := podnet.Expected{
		Bridge: conf.Bridge,
		Pod:    podnet.PodConfig{IfName: ifName, MTU: mtu, AllowIPForwarding: conf.ContainerSettings.AllowIPForwarding},
	}
	gwByFamily := map[int]net.IP{}
	for _, ipc := range ipcs {
		gw := ipc.Gateway
		if gw == nil && conf.IsGateway {
			gw = firstHost(ipc.Address)
		}
		a := podnet.Addr{IPNet: ipc.Address, Gateway: gw}
		want.Pod.Addrs = append(want.Pod.Addrs, a)
		fam := netconf.Family(ipc.Address.IP)
		if gw != nil {
			if _, ok := gwByFamily[fam]; !ok {
				gwByFamily[fam] = gw
			}
			if conf.IsGateway {
				want.Gateways = append(want.Gateways, net.IPNet{IP: gw, Mask: ipc.Address.Mask})
			}
		}
	}
	haveDefault := map[int]bool{}
	for _, r := range routes {
		fam := netconf.Family(r.Dst.IP)
		gw := r.GW
		if gw == nil {
			gw = gwByFamily[fam]
		}
		if ones, _ := r.Dst.Mask.Size(); ones == 0 {
			haveDefault[fam] = true
		}
		want.Pod.Routes = append(want.Pod.Routes, podnet.Route{Dst: r.Dst, GW: gw})
	}
	if conf.IsDefaultGateway {
		for _, fam := range []int{4, 6} {
			gw, ok := gwByFamily[fam]
			if !ok || haveDefault[fam] {
				continue
			}
			dst := net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
			if fam == 6 {
				dst = net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
			}
			want.Pod.Routes = append(want.Pod.Routes, podnet.Route{Dst: dst, GW: gw})
		}
	}
	return want
}

// firstHost is the first address after the network address, the
// conventional gateway when IPAM names none.
func firstHost(n net.IPNet) net.IP {
	ip := make(net.IP, len(n.IP.Mask(n.Mask)))
	copy(ip, n.IP.Mask(n.Mask))
	if v4 := ip.To4(); v4 != nil {
		ip = v4
	}
	ip[len(ip)-1]++
	return ip
}

// pend closes the pod's addresses both ways, before the pod has them,
// until the node agent has written its NetworkPolicy (netpolnft).
func (a *standaloneAdd) pend(ipcs []*current.IPConfig) error {
	var addrs []netip.Addr
	for _, c := range ipcs {
		if ad, ok := netip.AddrFromSlice(c.Address.IP); ok {
			addrs = append(addrs, ad.Unmap())
		}
	}
	m, err := netpolnft.New(-1)
	if err != nil {
		return err
	}
	defer m.Close()
	owner := netpolnft.Owner(portOwner(a.key, a.pod))
	if err := m.Pend(owner, addrs); err != nil {
		return err
	}
	a.rollback.push(func() error {
		m, err := netpolnft.New(-1)
		if err != nil {
			return err
		}
		defer m.Close()
		return m.Unpend(owner, addrs)
	})
	a.st.mark("policy")
	return nil
}
