package plugin

import (
	"errors"
	"fmt"
	"net"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/portmap"
)

// planPorts places the hostPorts netconf accepted on the pod's addresses.
// It cannot refuse anything: Parse already refused, before any change, a
// mapping that would clash in a family the pod may have.
func planPorts(conf *netconf.NetConf, podIPs []net.IP) []portmap.Mapping {
	return portmap.Plan(conf.RuntimeConfig.Ports, podIPs)
}

func portOwner(key state.Key, pod netconf.PodArgs) portmap.Owner {
	return portmap.Owner{ContainerID: key.ContainerID, IfName: key.IfName, PodNamespace: pod.Namespace, PodName: pod.Name}
}

// addPorts maps the hostPorts and returns the undo step. stateDir is the
// network's: the localnet markers live beside it.
func addPorts(owner portmap.Owner, stateDir, hostIface string, maps []portmap.Mapping) (func() error, error) {
	m, err := portmap.New(-1, portmap.WithLocalnetDir(portmap.LocalnetDir(stateDir)))
	if err != nil {
		return nil, err
	}
	defer m.Close()
	if err := m.Add(owner, hostIface, maps); err != nil {
		return nil, err
	}
	return func() error {
		m, err := portmap.New(-1)
		if err != nil {
			return err
		}
		defer m.Close()
		return m.Del(owner, maps)
	}, nil
}

// checkPorts compares the record's hostPorts with the kernel, and the
// localnet guard and route_localnet of hostIface when they are needed.
func checkPorts(rec *state.Record, hostIface string) error {
	if len(rec.Ports) == 0 {
		return nil
	}
	maps, err := portmap.FromState(rec.Ports)
	if err != nil {
		return err
	}
	m, err := portmap.New(-1)
	if err != nil {
		return err
	}
	defer m.Close()
	var errs []error
	if err := m.Check(portmap.OwnerOf(rec), maps); err != nil {
		errs = append(errs, err)
	}
	if hostIface != "" && portmap.NeedsLocalnet(maps) {
		if err := m.CheckLocalnet(hostIface); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("hostPorts of %s/%s: %w", rec.ContainerID, rec.IfName, err)
	}
	return nil
}

// gcPorts removes the elements of every attachment of this network that
// is not in valid.
func gcPorts(valid map[state.Key]bool, network string, store *state.Store) error {
	keep, err := keepOwner(valid, network, store)
	if err != nil {
		return err
	}
	m, err := portmap.New(-1)
	if err != nil {
		return err
	}
	defer m.Close()
	_, err = m.GC(keep)
	return err
}

// keepOwner says which element owners a CNI GC of network keeps: the
// attachments in valid. qoscni's table is shared by all qoscni networks of
// the node and elements do not name their network, so attachments another
// network still has a record for are left to that network's GC.
func keepOwner(valid map[state.Key]bool, network string, store *state.Store) (func(nfraw.Owner) bool, error) {
	others := map[[2]string]bool{}
	recs, _, err := store.List("")
	if err != nil {
		return nil, err
	}
	for _, r := range recs {
		if r.Network != network {
			others[[2]string{r.ContainerID, r.IfName}] = true
		}
	}
	return func(o nfraw.Owner) bool {
		return valid[state.Key{Network: network, ContainerID: o.ContainerID, IfName: o.IfName}] || others[[2]string{o.ContainerID, o.IfName}]
	}, nil
}
