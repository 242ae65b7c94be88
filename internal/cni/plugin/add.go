package plugin

import (
	"fmt"
	"net"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/qoscni/qoscni/internal/cni/netconf"
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

func (p *Plugin) addStandalone(args *skel.CmdArgs, conf *netconf.NetConf, pod netconf.PodArgs) (_ *current.Result, err error) {
	st := p.steps("ADD")
	defer st.done()
	store := state.New(conf.StateDir)
	key := state.Key{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName}
	if rec, lerr := store.Load(key); lerr == nil && rec != nil {
		if !rec.Provisional {
			return nil, types.NewError(ErrAttachmentExists,
				fmt.Sprintf("attachment %s/%s already exists in network %s (DEL it first)", args.ContainerID, args.IfName, conf.Name), "")
		}
		// An earlier ADD of this attachment was killed half way and no DEL
		// came: what it left goes first.
		src, err := newAddrSource(conf)
		if err != nil {
			return nil, err
		}
		if err := p.teardown(conf, src, store, key, rec, true); err != nil {
			return nil, fmt.Errorf("remove what an unfinished ADD of %s/%s left: %w", args.ContainerID, args.IfName, err)
		}
	}

	netns, err := podnet.OpenNetNS(args.Netns)
	if err != nil {
		return nil, err
	}
	defer netns.Close()
	host, err := hostHandle()
	if err != nil {
		return nil, err
	}
	defer host.Close()
	podH, err := netlink.NewHandleAt(netns.Handle)
	if err != nil {
		return nil, fmt.Errorf("open netlink in %s: %w", args.Netns, err)
	}
	defer podH.Close()
	st.mark("open")

	if exists, err := podnet.LinkExists(podH, args.IfName); err != nil {
		return nil, err
	} else if exists {
		return nil, podnet.ErrIfExists(args.IfName, args.Netns)
	}

	mtu := conf.MTU
	if mtu == 0 {
		mtu = podnet.DefaultMTU(host)
	}
	shape, err := shapingPlan(conf, mtu)
	if err != nil {
		return nil, err
	}
	logClamps(p.Log, args.ContainerID, args.IfName, shape)

	var rollback undo
	defer func() {
		if err != nil {
			rollback.run(p.Log)
		}
	}()

	src, err := newAddrSource(conf)
	if err != nil {
		return nil, err
	}
	// Before the first change: a record saying this ADD is under way, so
	// that DEL, GC and the agent find what it made if it is killed before
	// the full record replaces this one.
	hostName := podnet.HostVethName(args.ContainerID, args.IfName)
	p.registerStateDir(conf.StateDir)
	if err := store.SaveProvisional(&state.Record{
		Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName, Netns: args.Netns,
		Pod:  state.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		Mode: state.ModeStandalone, Bridge: conf.Bridge, HostVeth: hostName, IPMasq: conf.IPMasq,
		Created: time.Now().UTC(),
	}); err != nil {
		return nil, err
	}
	rollback.push(func() error { return store.Delete(key) })
	st.mark("provisional")
	ipcs, ipamRoutes, dns, err := src.allocate(args.ContainerID, args.IfName)
	if err != nil {
		return nil, err
	}
	rollback.push(func() error { return src.release(args.ContainerID, args.IfName) })
	st.mark("ipam")

	br, err := podnet.EnsureBridge(host, podnet.BridgeConfig{Name: conf.Bridge, MTU: mtu, Promisc: conf.PromiscMode})
	if err != nil {
		return nil, err
	}

	st.mark("bridge")
	// A host veth under our deterministic name with no state record is what
	// an ADD killed half way leaves behind; the runtime has already given up
	// on it, so it is replaced.
	if err := podnet.DeleteLink(host, hostName); err != nil {
		return nil, err
	}
	veth, err := podnet.CreateVeth(host, netns, podH, hostName, args.IfName, mtu)
	if err != nil {
		return nil, err
	}
	rollback.push(func() error { return podnet.DeleteLink(host, hostName) })
	st.mark("veth-created")
	if err := podnet.AttachHost(host, veth.Host, br, conf.HairpinMode); err != nil {
		return nil, err
	}

	st.mark("veth")
	want := planPod(conf, args.IfName, mtu, ipcs, ipamRoutes)
	if err := podnet.ConfigurePod(netns, podH, veth.Pod, want.Pod); err != nil {
		return nil, err
	}
	var v4, v6 bool
	for _, gw := range want.Gateways {
		if err := podnet.EnsureGatewayAddr(host, br, gw.IP, gw.Mask); err != nil {
			return nil, err
		}
		v4 = v4 || gw.IP.To4() != nil
		v6 = v6 || gw.IP.To4() == nil
	}
	st.mark("pod")
	if err := podnet.EnableForwarding(v4, v6); err != nil {
		return nil, err
	}
	if err := podnet.EnableBridgeNetfilter(); err != nil {
		return nil, err
	}

	st.mark("sysctl")
	ifb := podnet.IFBName(args.ContainerID, args.IfName)
	if !shape.Empty() {
		sh, err := shaping.Open(-1)
		if err != nil {
			return nil, err
		}
		defer sh.Close()
		rollback.push(func() error { return podnet.DeleteLink(host, ifb) })
		if err := sh.ApplyFresh(shaping.Desired{HostVeth: hostName, IFB: ifb, MTU: mtu, Plan: shape}); err != nil {
			return nil, fmt.Errorf("shape %s/%s: %w", args.ContainerID, args.IfName, err)
		}
	}
	st.mark("shaping")
	if conf.IPMasq {
		m, err := podnet.NewMasq(-1)
		if err != nil {
			return nil, err
		}
		var nets []net.IPNet
		for _, a := range want.Pod.Addrs {
			nets = append(nets, a.IPNet)
		}
		if err := m.Add(nets); err != nil {
			return nil, err
		}
		rollback.push(func() error { return m.Del(ipsOf(want.Pod.Addrs)) })
	}

	st.mark("masq")
	ports := planPorts(conf, ipsOf(want.Pod.Addrs))
	if len(ports) > 0 {
		undoPorts, err := addPorts(portOwner(key, pod), conf.StateDir, conf.Bridge, ports)
		if err != nil {
			return nil, err
		}
		rollback.push(undoPorts)
	}
	st.mark("ports")
	// Refresh for the MACs the kernel assigned.
	hostLink, err := host.LinkByIndex(veth.Host.Attrs().Index)
	if err != nil {
		return nil, fmt.Errorf("look up %s: %w", hostName, err)
	}
	brLink, err := host.LinkByIndex(br.Attrs().Index)
	if err != nil {
		return nil, fmt.Errorf("look up bridge %s: %w", conf.Bridge, err)
	}

	rec := &state.Record{
		Network:         conf.Name,
		ContainerID:     args.ContainerID,
		IfName:          args.IfName,
		Netns:           args.Netns,
		Pod:             state.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		Mode:            state.ModeStandalone,
		Bridge:          conf.Bridge,
		HostVeth:        hostName,
		PodMAC:          veth.Pod.Attrs().HardwareAddr.String(),
		MTU:             mtu,
		IPMasq:          conf.IPMasq,
		Shaping:         shaping.ToRecord(shape, hostName, ifb),
		ShapingDefaults: shapingDefaults(conf),
		Ports:           portmap.ToState(ports),
		Created:         time.Now().UTC(),
	}
	for _, a := range want.Pod.Addrs {
		rec.IPs = append(rec.IPs, a.IPNet.String())
		if a.Gateway != nil {
			rec.Gateways = append(rec.Gateways, a.Gateway.String())
		}
	}
	if err := store.Save(rec); err != nil {
		return nil, err
	}
	st.mark("state")

	res := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: conf.Bridge, Mac: brLink.Attrs().HardwareAddr.String()},
			{Name: hostName, Mac: hostLink.Attrs().HardwareAddr.String()},
			{Name: args.IfName, Mac: rec.PodMAC, Sandbox: args.Netns, Mtu: mtu},
		},
	}
	if shape.Egress != nil {
		res.Interfaces = appendIFB(host, res.Interfaces, ifb)
	}
	for _, a := range want.Pod.Addrs {
		res.IPs = append(res.IPs, &current.IPConfig{
			Interface: current.Int(2),
			Address:   a.IPNet,
			Gateway:   a.Gateway,
		})
	}
	for _, r := range want.Pod.Routes {
		res.Routes = append(res.Routes, &types.Route{Dst: r.Dst, GW: r.GW})
	}
	res.DNS = conf.DNS
	if dns != nil && !dns.IsEmpty() && conf.DNS.IsEmpty() {
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
