package plugin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/ipam"
)

// GC removes every attachment of this network that the runtime does not
// list in cni.dev/valid-attachments: devices, nftables elements, state
// records and addresses.
func (p *Plugin) GC(args *skel.CmdArgs, conf *netconf.NetConf, _ netconf.PodArgs) error {
	valid := make(map[state.Key]bool, len(conf.ValidAttachments))
	var validIPAM []ipam.Attachment
	for _, a := range conf.ValidAttachments {
		valid[state.Key{Network: conf.Name, ContainerID: a.ContainerID, IfName: a.IfName}] = true
		validIPAM = append(validIPAM, ipam.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	src, err := newAddrSource(conf)
	if err != nil {
		return err
	}
	store := state.New(conf.StateDir)
	entries, bad, err := store.Entries(conf.Name)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		rec := e.Record
		if e.Misplaced {
			// Device names do not carry the network, so tearing down a copy
			// of another network's record (or of another attachment's)
			// would take that attachment's veth and IFB.
			p.Log.Warn("skipping a state record stored where it does not belong", "path", e.Path,
				"network", rec.Network, "container", rec.ContainerID, "ifname", rec.IfName, "gcNetwork", conf.Name)
			continue
		}
		if valid[rec.Key()] {
			continue
		}
		// The allocator's GC below releases the addresses; delegated IPAM
		// gets its own GC call with the same valid list.
		if err := p.teardown(conf, src, store, rec.Key(), rec, false); err != nil {
			errs = append(errs, fmt.Errorf("gc %s/%s: %w", rec.ContainerID, rec.IfName, err))
		}
	}
	if len(bad) > 0 {
		// Devices are named after container ID and interface name only: an
		// attachment another network has a record for is that network's.
		others := map[[2]string]bool{}
		all, _, err := store.List("")
		if err != nil {
			return err
		}
		for _, r := range all {
			if r.Network != conf.Name {
				others[[2]string{r.ContainerID, r.IfName}] = true
			}
		}
		for _, b := range bad {
			if err := p.gcBadFile(conf, src, store, valid, others, b); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// hostPort elements of attachments whose record is already gone.
	if err := gcPorts(valid, conf.Name, store); err != nil {
		errs = append(errs, fmt.Errorf("gc hostPorts: %w", err))
	}
	if err := gcControls(valid, conf.Name, store); err != nil {
		errs = append(errs, fmt.Errorf("gc controls: %w", err))
	}
	if err := gcPending(valid, conf.Name, store); err != nil {
		errs = append(errs, fmt.Errorf("gc NetworkPolicy pending elements: %w", err))
	}
	if src.alloc != nil {
		if _, err := src.alloc.GC(validIPAM); err != nil {
			errs = append(errs, fmt.Errorf("gc addresses: %w", err))
		}
	} else if conf.IPAM.Type != "" {
		ctx, cancel := context.WithTimeout(context.Background(), delegateTimeout)
		defer cancel()
		if err := ignoreOut(delegate(ctx, "GC", conf.IPAM.Type, conf.Raw)); err != nil {
			errs = append(errs, fmt.Errorf("ipam plugin %s GC: %w", conf.IPAM.Type, err))
		}
	}
	return errors.Join(errs...)
}

// gcBadFile tears down the attachment of an unreadable record that the
// runtime no longer lists, as DEL does: from the file name and the IPAM
// store. The addresses are released by the allocator's GC afterwards, so
// leaving it would leak the devices and nftables elements that still use
// them. A file whose name is not one the store writes (or is bounded, so
// the container ID cannot be read back), or that is a directory, is left
// for an operator.
func (p *Plugin) gcBadFile(conf *netconf.NetConf, src *addrSource, store *state.Store, valid map[state.Key]bool, others map[[2]string]bool, b state.BadFile) error {
	key, ok := state.KeyFromFileName(conf.Name, filepath.Base(b.Path))
	if !ok || store.Path(key) != b.Path {
		p.Log.Warn("unreadable state record left in place: its name does not give the attachment", "path", b.Path, "err", b.Err)
		return nil
	}
	if valid[key] {
		p.Log.Warn("unreadable state record of a live attachment", "path", b.Path, "container", key.ContainerID, "ifname", key.IfName, "err", b.Err)
		return nil
	}
	if others[[2]string{key.ContainerID, key.IfName}] {
		p.Log.Warn("unreadable state record left in place: another network has a record of that attachment", "path", b.Path,
			"container", key.ContainerID, "ifname", key.IfName, "err", b.Err)
		return nil
	}
	if st, err := os.Stat(b.Path); err == nil && st.IsDir() {
		p.Log.Warn("state record path is a directory, left in place", "path", b.Path)
		return nil
	}
	p.Log.Warn("removing attachment with an unreadable state record", "path", b.Path, "container", key.ContainerID, "ifname", key.IfName, "err", b.Err)
	if err := p.teardown(conf, src, store, key, nil, false); err != nil {
		return fmt.Errorf("gc %s/%s (unreadable record %s): %w", key.ContainerID, key.IfName, b.Path, err)
	}
	return nil
}

// Status reports whether ADD can succeed now: error 51 when br_netfilter
// cannot be made to pass bridged traffic to iptables (bridgeNetfilter),
// error 50 when a range set has no free address (or the delegated IPAM
// says so).
//
// STATUS carries no prevResult, so it cannot tell a chained entry by
// that. A config without IPAM can only run chained (a standalone ADD
// refuses it), and there the bridge, if any, is the main plugin's, and so
// is br_netfilter: such a STATUS leaves it alone.
func (p *Plugin) Status(_ *skel.CmdArgs, conf *netconf.NetConf, _ netconf.PodArgs) error {
	if conf.BuiltinIPAM() || conf.IPAM.Type != "" {
		if err := p.bridgeNetfilter(); err != nil {
			return err
		}
	}
	src, err := newAddrSource(conf)
	if err != nil {
		return err
	}
	if src.alloc != nil {
		return src.alloc.Status()
	}
	if conf.IPAM.Type == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), delegateTimeout)
	defer cancel()
	return ignoreOut(delegate(ctx, "STATUS", conf.IPAM.Type, conf.Raw))
}

// bridgeNetfilter makes the node pass bridged pod traffic to iptables, as
// a standalone ADD needs it and before ADD changes anything: without it a
// pod's Service whose endpoint sits on the same bridge breaks, silently
// (the reply bypasses conntrack). So where it cannot be done both ADD and
// STATUS fail with the same error 51, which names the module, the sysctl
// and the fix: STATUS because it is what runtimes that poll it
// (containerd 2) turn into the node's NetworkReady condition, ADD because
// the runtimes that do not poll it (containerd 1.6 and 1.7) would
// otherwise start pods that cannot use their Services, and because by the
// spec a failing STATUS means that ADD cannot succeed.
//
// STATUS also sets the sysctls back to 1 where it can, as ADD does: one
// set to 0 by hand (or by a sysctl.d file applied when the module was
// loaded) breaks the Services of the pods already running, and answering
// "not available" instead would take the node out of service with
// nothing left to repair it, since the runtime stops calling ADD.
func (p *Plugin) bridgeNetfilter() error {
	found, err := podnet.OwnBridgeNetfilter().Ensure()
	for _, s := range found {
		if s.Changed() {
			p.Log.Warn("set a br_netfilter sysctl back to 1 in the node's namespace: Services whose endpoint is on the same bridge need it",
				"sysctl", s.Name, "was", s.Was)
		}
	}
	return err
}
