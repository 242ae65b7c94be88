package plugin

import (
	"github.com/containernetworking/cni/pkg/skel"
	"time"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/netpolnft"
	"github.com/qoscni/qoscni/internal/cni/teardown"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/portmap"
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

// teardown is DEL's, and also CNI GC's and ADD's for what a killed ADD
// left. Order matters for a crash half way: kernel objects first, the
// state record next, the addresses last, so an address is never free
// while a device or rule still uses it; a DEL killed after the record
// went finds the addresses by owner at the runtime's next DEL or GC.
// releaseAddrs is false for CNI GC, whose allocator GC releases them all
// at once afterwards.
func (p *Plugin) teardown(conf *netconf.NetConf, src *addrSource, store *state.Store, key state.Key, rec *state.Record, releaseAddrs bool) error {
	st := p.steps("DEL")
	defer st.done()
	order := []teardown.Step{teardown.Devices, teardown.Masq, teardown.Ports, teardown.Record}
	if releaseAddrs {
		order = append(order, teardown.Addresses)
	}
	// The step names test/reliability kills DEL at (delSteps).
	points := map[teardown.Step]string{teardown.Devices: "veth", teardown.Masq: "masq", teardown.Ports: "ports",
		teardown.Record: "state", teardown.Addresses: "ipam"}
	return teardown.Run(key, rec, teardown.Options{
		Order:   order,
		NetnsFd: -1,
		Store:   store,
		IPAM:    src,
		Masq:    conf.IPMasq,
		// An agent killed between its release and its record delete leaves
		// a record whose addresses another pod may hold by now: their
		// masquerade is that pod's.
		SpareReassigned: true,
		// With a provisional record (or none) the elements go by owner.
		Cleaners:        []teardown.Cleaner{portmap.NewCleaner(-1), controls.NewCleaner(-1), netpolnft.NewCleaner(-1)},
		ReleaseLocalnet: true,
		LocalnetDir:     portmap.LocalnetDir(conf.StateDir),
		HierarchyLock:   p.hierarchyLock(),
		Concurrent:      true,
		OneTransaction:  true,
		Mark:            func(s teardown.Step, took time.Duration) { st.markTook(points[s], took) },
	})
}
