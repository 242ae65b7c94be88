package plugin

import (
	"fmt"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/qoscni/qoscni/netconf"
	"github.com/qoscni/qoscni/podnet"
	"github.com/qoscni/qoscni/state"
)

// addChained follows another main plugin: the pod is already wired, so
// qoscni finds the host end of the pod's veth and records the attachment
// for the features that act on it, passing the previous result through.
func (p *Plugin) addChained(args *skel.CmdArgs, conf *netconf.NetConf, pod netconf.PodArgs) error {
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
	}
	hostName, err := hostSideOf(args)
	if err != nil {
		return err
	}
	rec := &state.Record{
		Network:     conf.Name,
		ContainerID: args.ContainerID,
		IfName:      args.IfName,
		Netns:       args.Netns,
		Pod:         state.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		Mode:        state.ModeChained,
		HostVeth:    hostName,
		Created:     time.Now().UTC(),
	}
	for _, ipc := range prev.IPs {
		rec.IPs = append(rec.IPs, ipc.Address.String())
	}
	if err := state.New(conf.StateDir).Save(rec); err != nil {
		return err
	}
	return types.PrintResult(prev, conf.CNIVersion)
}

// hostSideOf finds the node-side peer of the pod's veth through the peer
// index the kernel reports for it.
func hostSideOf(args *skel.CmdArgs) (string, error) {
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
	host, err := hostHandle()
	if err != nil {
		return "", err
	}
	defer host.Close()
	hl, err := host.LinkByIndex(pl.Attrs().ParentIndex)
	if err != nil {
		return "", fmt.Errorf("host peer of %s (index %d): %w", args.IfName, pl.Attrs().ParentIndex, err)
	}
	return hl.Attrs().Name, nil
}
