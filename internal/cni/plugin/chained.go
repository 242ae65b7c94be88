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

// addChained follows another main plugin: the pod is already wired, so
// qoscni finds the host end of the pod's veth and records the attachment
// for the features that act on it, passing the previous result through.
func (p *Plugin) addChained(args *skel.CmdArgs, conf *netconf.NetConf, pod netconf.PodArgs) error {
	st := p.steps("ADD-chained")
	defer st.done()
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
	}
	host, err := hostHandle()
	if err != nil {
		return err
	}
	defer host.Close()
	hostName, mtu, err := hostSide(host, args, prev)
	if err != nil {
		return err
	}
	shape, g, err := p.shapingPlan(conf, pod, mtu)
	if err != nil {
		return err
	}
	logClamps(p.Log, args.ContainerID, args.IfName, shape)
	ctl, err := planControls(conf)
	if err != nil {
		return err
	}
	var podIPs []net.IP
	for _, ipc := range prev.IPs {
		podIPs = append(podIPs, ipc.Address.IP)
	}
	// undo takes back, in reverse, what this ADD did to the kernel.
	var undo undo
	fail := func(err error) error {
		undo.run(p.Log)
		return err
	}
	ports := planPorts(conf, podIPs)
	ifb := podnet.IFBName(args.ContainerID, args.IfName)
	if !shape.Empty() {
		sh, err := shaping.Open(-1)
		if err != nil {
			return err
		}
		defer sh.Close()
		// Leave the main plugin's veth as we found it.
		undo.push(func() error { return p.removeShapingErr(hostName, ifb) })
		if _, err := sh.Apply(shaping.Desired{HostVeth: hostName, IFB: ifb, MTU: mtu, Plan: shape}); err != nil {
			return fail(fmt.Errorf("shape %s/%s on %s: %w", args.ContainerID, args.IfName, hostName, err))
		}
		if shape.Egress != nil {
			prev.Interfaces = appendIFB(host, prev.Interfaces, ifb)
		}
	}
	var minor uint16
	if !g.Empty() {
		m, undoJoin, err := p.joinHierarchy(g, conf.Capacity, hostName, podIPs)
		if err != nil {
			return fail(err)
		}
		minor = m
		undo.push(undoJoin)
	}
	st.mark("shaping")
	if len(ports) > 0 {
		key := state.Key{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName}
		undoPorts, err := addPorts(portOwner(key, pod), conf.StateDir, routeLocalnetIface(host, prev, hostName), ports)
		if err != nil {
			return fail(err)
		}
		undo.push(undoPorts)
	}
	st.mark("ports")
	if !ctl.Empty() {
		key := state.Key{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName}
		undoControls, err := addControls(portOwner(key, pod), podIPs, ctl)
		if err != nil {
			return fail(err)
		}
		undo.push(undoControls)
	}
	st.mark("controls")
	rec := &state.Record{
		Network:         conf.Name,
		ContainerID:     args.ContainerID,
		IfName:          args.IfName,
		Netns:           args.Netns,
		Pod:             state.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		Mode:            state.ModeChained,
		HostVeth:        hostName,
		MTU:             mtu,
		Shaping:         shaping.RecordOf(shape, g, minor, hostName, ifb),
		ShapingDefaults: shapingDefaults(conf),
		Ports:           portmap.ToState(ports),
		Controls:        ctl,
		Created:         time.Now().UTC(),
	}
	for _, ipc := range prev.IPs {
		rec.IPs = append(rec.IPs, ipc.Address.String())
	}
	p.registerStateDir(conf.StateDir)
	if err := state.New(conf.StateDir).Save(rec); err != nil {
		return fail(err)
	}
	st.mark("state")
	return types.PrintResult(prev, conf.CNIVersion)
}

// hostSide is the host end of the pod's interface and its MTU: the veth
// peer the kernel reports, or else the one host-side interface of the
// previous result, as the reference plugin takes it.
func hostSide(host *netlink.Handle, args *skel.CmdArgs, prev *current.Result) (string, int, error) {
	name, err := hostSideOf(host, args)
	if err != nil {
		alt, ok := hostSideFromResult(host, prev)
		if !ok {
			return "", 0, err
		}
		name = alt
	}
	hl, err := host.LinkByName(name)
	if err != nil {
		return "", 0, fmt.Errorf("host interface %s of %s/%s: %w", name, args.ContainerID, args.IfName, err)
	}
	return name, hl.Attrs().MTU, nil
}

// hostSideOf finds the node-side peer of the pod's veth through the peer
// index the kernel reports for it.
func hostSideOf(host *netlink.Handle, args *skel.CmdArgs) (string, error) {
	netns, err := podnet.OpenNetNS(args.Netns)
	if err != nil {
		return "", err
	}
	defer netns.Close()
	podH, err := netlink.NewHandleAt(netns.Handle)
	if err != nil {
		return "", fmt.Errorf("open netlink in %s: %w", args.Netns, err)
	}
	defer podH.Close()
	pl, err := podH.LinkByName(args.IfName)
	if err != nil {
		return "", fmt.Errorf("pod interface %s in %s: %w", args.IfName, args.Netns, err)
	}
	if pl.Type() != "veth" || pl.Attrs().ParentIndex == 0 {
		return "", types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("invalid prevResult: pod interface %s is a %s; qoscni chains only after plugins that make veth pairs", args.IfName, pl.Type()), "")
	}
	hl, err := host.LinkByIndex(pl.Attrs().ParentIndex)
	if err != nil {
		return "", fmt.Errorf("host peer of %s (index %d): %w", args.IfName, pl.Attrs().ParentIndex, err)
	}
	return hl.Attrs().Name, nil
}

// hostSideFromResult picks the previous result's only host-side interface
// (no sandbox) that exists in the node namespace.
func hostSideFromResult(host *netlink.Handle, prev *current.Result) (string, bool) {
	var found []string
	for _, ifc := range prev.Interfaces {
		if ifc.Sandbox != "" {
			continue
		}
		l, err := host.LinkByName(ifc.Name)
		if err != nil || l.Type() == "bridge" {
			continue
		}
		found = append(found, ifc.Name)
	}
	if len(found) != 1 {
		return "", false
	}
	return found[0], true
}

func (p *Plugin) removeShapingErr(hostVeth, ifb string) error {
	sh, err := shaping.Open(-1)
	if err != nil {
		return err
	}
	defer sh.Close()
	return sh.Remove(hostVeth, ifb)
}

// routeLocalnetIface is where localhost hostPort traffic leaves the node
// for the pod: the main plugin's bridge when it has one, else the veth.
func routeLocalnetIface(host *netlink.Handle, prev *current.Result, hostVeth string) string {
	for _, ifc := range prev.Interfaces {
		if ifc.Sandbox != "" {
			continue
		}
		if l, err := host.LinkByName(ifc.Name); err == nil && l.Type() == "bridge" {
			return ifc.Name
		}
	}
	return hostVeth
}

// appendIFB adds the attachment's IFB to a result's interfaces.
func appendIFB(host *netlink.Handle, ifs []*current.Interface, ifb string) []*current.Interface {
	if l, err := host.LinkByName(ifb); err == nil {
		ifs = append(ifs, &current.Interface{Name: ifb, Mac: l.Attrs().HardwareAddr.String()})
	}
	return ifs
}
