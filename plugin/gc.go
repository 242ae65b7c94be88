package plugin

import (
	"context"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/qoscni/qoscni/ipam"
	"github.com/qoscni/qoscni/state"
)

// GC removes every attachment of this network that the runtime does not
// list in cni.dev/valid-attachments: devices, nftables elements, state
// records and addresses.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	conf, _, err := parse(args)
	if err != nil {
		return err
	}
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
	recs, bad, err := store.List(conf.Name)
	if err != nil {
		return err
	}
	for _, b := range bad {
		p.Log.Warn("unreadable state record", "path", b.Path, "err", b.Err)
	}
	var errs []error
	for _, rec := range recs {
		if valid[rec.Key()] {
			continue
		}
		// The allocator's GC below releases the addresses; delegated IPAM
		// gets its own GC call with the same valid list.
		if err := p.teardown(conf, src, store, rec.Key(), rec, false); err != nil {
			errs = append(errs, fmt.Errorf("gc %s/%s: %w", rec.ContainerID, rec.IfName, err))
		}
	}
	// hostPort elements of attachments whose record is already gone.
	if err := gcPorts(valid, conf.Name, store); err != nil {
		errs = append(errs, fmt.Errorf("gc hostPorts: %w", err))
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

// Status reports whether ADD can succeed now: error 50 when a range set has
// no free address (or the delegated IPAM says so).
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, _, err := parse(args)
	if err != nil {
		return err
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
