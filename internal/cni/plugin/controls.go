package plugin

import (
	"fmt"
	"net"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/netpolnft"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// planControls reads the pod's packet-rate, connection and DSCP controls
// from its annotations, before anything changes (nil: none).
func planControls(conf *netconf.NetConf) (*state.Controls, error) {
	return shaping.ParseControls(conf.RuntimeConfig.PodAnnotations)
}

// addControls sets the controls on the pod's addresses and returns the
// undo step.
func addControls(owner controls.Owner, ips []net.IP, c *state.Controls) (func() error, error) {
	m, err := controls.New(-1)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	if err := m.Set(owner, ips, c); err != nil {
		return nil, err
	}
	return func() error {
		m, err := controls.New(-1)
		if err != nil {
			return err
		}
		defer m.Close()
		return m.Del(owner, ips)
	}, nil
}

// checkControls compares the record's controls with the kernel.
func checkControls(rec *state.Record) error {
	if rec.Controls.Empty() {
		return nil
	}
	ips, err := controls.IPsOf(rec)
	if err != nil {
		return err
	}
	m, err := controls.New(-1)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.Check(controls.OwnerOf(rec), ips, rec.Controls); err != nil {
		return fmt.Errorf("controls of %s/%s: %w", rec.ContainerID, rec.IfName, err)
	}
	return nil
}

// gcControls removes the control elements of every attachment of this
// network that is not in valid, as gcPorts does for hostPorts.
func gcControls(valid map[state.Key]bool, network string, store *state.Store) error {
	keep, err := keepOwner(valid, network, store)
	if err != nil {
		return err
	}
	m, err := controls.New(-1)
	if err != nil {
		return err
	}
	defer m.Close()
	_, err = m.GC(keep)
	return err
}

// gcPending removes the NetworkPolicy pending elements whose attachment
// is neither valid nor recorded (an ADD killed before its record, then
// a GC).
func gcPending(valid map[state.Key]bool, network string, store *state.Store) error {
	keep, err := keepOwner(valid, network, store)
	if err != nil {
		return err
	}
	m, err := netpolnft.New(-1)
	if err != nil {
		return err
	}
	defer m.Close()
	_, err = m.GC(keep)
	return err
}
