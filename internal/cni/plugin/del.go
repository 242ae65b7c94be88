package plugin

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/shaping"
)

// Del removes everything the attachment holds. It is idempotent: a missing
// netns, veth, record or reservation is success, and it works from the
// config alone (containerd's second DEL has no netns and no prevResult).
// conf is from netconf.ParseForDel (see forDel).
func (p *Plugin) Del(args *skel.CmdArgs, conf *netconf.NetConf) error {
	if conf.Problem != nil {
		p.Log.Warn("DEL of a config ADD would refuse: removing the attachment by its identity", "container", args.ContainerID,
			"ifname", args.IfName, "network", conf.Name, "problem", conf.Problem)
	}
	if conf.BuiltinIPAM() {
		// Freeing by owner needs no ranges, and opening the store by
		// directory creates nothing on a node the network never used.
		conf.IPAMStoreOnly, conf.IPAMStoreDir = true, conf.IPAMConfig.DataDir
	}
	store := state.New(conf.StateDir)
	key := state.Key{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName}
	rec, err := store.Load(key)
	if err != nil {
		// A corrupt record must not block cleanup: everything it would tell
		// us is derivable from the attachment and the IPAM store.
		p.Log.Warn("ignoring unreadable state record", "container", args.ContainerID, "ifname", args.IfName, "err", err)
		rec = nil
	}
	src, err := newAddrSource(conf)
	if err != nil {
		return err
	}
	return p.teardown(conf, src, store, key, rec, true)
}

// teardown is shared by DEL and GC. Order matters for a crash half way:
// kernel objects first, the state record next, the addresses last, so an
// address is never free while a device or rule still uses it.
func (p *Plugin) teardown(conf *netconf.NetConf, src *addrSource, store *state.Store, key state.Key, rec *state.Record, releaseAddrs bool) error {
	st := p.steps("DEL")
	defer st.done()
	var errs []error
	ifb := podnet.IFBName(key.ContainerID, key.IfName)
	if rec != nil && rec.Shaping != nil && rec.Shaping.IFB != "" {
		ifb = rec.Shaping.IFB
	}
	// A provisional record (an ADD killed half way) knows only the
	// attachment: its addresses come from the IPAM store, its hostPorts
	// go by owner, as without a record.
	full := rec
	if rec != nil && rec.Provisional {
		full = nil
	}
	if rec != nil && rec.Mode == state.ModeChained {
		// Behind a main plugin without a bridge the localnet guard sits on
		// this pod's own veth: it goes first (then the clsact qdisc is
		// empty and goes with the shaping).
		if err := portmap.ReleaseLocalnet(-1, portmap.LocalnetDir(conf.StateDir), rec.HostVeth); err != nil {
			errs = append(errs, fmt.Errorf("release route_localnet of %s: %w", rec.HostVeth, err))
		}
		// The veth is the main plugin's: take only our qdiscs off it.
		sh, err := shaping.Open(-1)
		if err != nil {
			return err
		}
		defer sh.Close()
		if err := sh.Remove(rec.HostVeth, ifb); err != nil {
			errs = append(errs, fmt.Errorf("remove shaping of %s/%s: %w", key.ContainerID, key.IfName, err))
		}
	} else {
		host, err := hostHandle()
		if err != nil {
			return err
		}
		defer host.Close()
		if err := podnet.DeleteLink(host, podnet.HostVethName(key.ContainerID, key.IfName)); err != nil {
			errs = append(errs, err)
		}
		if err := podnet.DeleteLink(host, ifb); err != nil {
			errs = append(errs, err)
		}
	}

	st.mark("veth")
	ips, err := attachmentIPs(src, key, full)
	if err != nil {
		errs = append(errs, err)
	}
	if len(ips) > 0 && (conf.IPMasq || (rec != nil && rec.IPMasq)) {
		m, err := podnet.NewMasq(-1)
		if err == nil {
			err = m.Del(ips)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove ipMasq of %s/%s: %w", key.ContainerID, key.IfName, err))
		}
	}
	st.mark("masq")
	if full == nil || len(full.Ports) > 0 {
		if err := delPorts(key, full); err != nil {
			errs = append(errs, fmt.Errorf("remove hostPorts of %s/%s: %w", key.ContainerID, key.IfName, err))
		}
	}
	st.mark("ports")
	if len(errs) > 0 {
		// Keep the record and addresses so a retry still knows what to clean.
		return errors.Join(errs...)
	}
	if err := store.Delete(key); err != nil {
		return err
	}
	st.mark("state")
	if releaseAddrs && (rec == nil || rec.Mode != state.ModeChained) {
		if err := src.release(key.ContainerID, key.IfName); err != nil {
			return err
		}
		st.mark("ipam")
	}
	return nil
}

func attachmentIPs(src *addrSource, key state.Key, rec *state.Record) ([]net.IP, error) {
	if rec != nil {
		var out []net.IP
		for _, c := range rec.IPs {
			ip, _, err := net.ParseCIDR(c)
			if err == nil {
				out = append(out, ip)
			}
		}
		return out, nil
	}
	ips, err := src.held(key.ContainerID, key.IfName)
	if err != nil {
		return nil, fmt.Errorf("look up addresses of %s/%s: %w", key.ContainerID, key.IfName, err)
	}
	return ips, nil
}
