package portmap

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/tcdump"
)

// LocalnetUndo is what UninstallLocalnet did on one interface.
type LocalnetUndo struct {
	IfName string
	// ResetRouteLocalnet: set back to 0; qoscni had turned it on.
	ResetRouteLocalnet bool
	// KeptRouteLocalnet: left at 1, as it was before qoscni. (Neither:
	// it is 0 already.)
	KeptRouteLocalnet bool
	// RemovedGuard: the localnet guard was taken off.
	RemovedGuard bool
}

// UninstallLocalnet undoes what ensureLocalnet did, for good: on every
// interface a valid marker in dirs names, route_localnet goes back to 0
// where qoscni set it (before its guards go: the sysctl is never on
// without them), then the guard and a clsact qdisc that qoscni added and
// nothing else uses go; then any other guard of ours on any interface;
// then the markers. Markers on a read-only mount stay (they are ignored
// once their interface or the boot is gone, and a later install reuses
// them truthfully).
func UninstallLocalnet(nsFd int, dirs ...string) ([]LocalnetUndo, error) {
	boot, err := bootID()
	if err != nil {
		return nil, err
	}
	h, err := linkHandle(nsFd)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	c, err := openTC(nsFd)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	var out []LocalnetUndo
	var errs []error
	done := map[int]bool{}
	var files []string
	for _, dir := range dirs {
		markers, bad, err := readMarkers(dir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		files = append(files, bad...)
		for _, mk := range markers {
			files = append(files, markerPath(dir, mk.IfName))
			idx, err := guardable(h, mk.IfName)
			if mk.BootID != boot || err != nil || idx != mk.IfIndex || done[idx] {
				continue
			}
			done[idx] = true
			u := LocalnetUndo{IfName: mk.IfName}
			on, err := readRouteLocalnet(nsFd, mk.IfName)
			switch {
			case err != nil:
				errs = append(errs, err)
				continue
			case on && mk.SetRouteLocalnet:
				if err := writeRouteLocalnet(nsFd, mk.IfName, idx, false); err != nil {
					// Its guards stay: the sysctl must not lose them.
					errs = append(errs, err)
					continue
				}
				u.ResetRouteLocalnet = true
			case on:
				u.KeptRouteLocalnet = true
			}
			u.RemovedGuard, err = removeGuard(c, mk.IfName, uint32(idx), mk.CreatedClsact)
			if err != nil {
				errs = append(errs, err)
			}
			out = append(out, u)
		}
	}
	// Guards without a marker (a marker directory lost, or another state
	// directory's): one qdisc dump, then the hooks that exist.
	links, err := h.LinkList()
	if err != nil {
		errs = append(errs, fmt.Errorf("list links: %w", err))
	}
	qdiscs, err := tcdump.QdiscsAt(nsFd)
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range links {
		idx := l.Attrs().Index
		if done[idx] || !hasHook(qdiscs, uint32(idx)) {
			continue
		}
		st, err := readGuardFilters(c, uint32(idx), true)
		if err != nil || !st.ours {
			continue
		}
		removed, err := removeGuard(c, l.Attrs().Name, uint32(idx), false)
		if err != nil {
			errs = append(errs, err)
		}
		if removed {
			out = append(out, LocalnetUndo{IfName: l.Attrs().Name, RemovedGuard: true})
		}
	}
	if len(errs) > 0 {
		// Keep the markers: a second uninstall still knows what to reset.
		return out, errors.Join(errs...)
	}
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.EROFS) && !errors.Is(err, fs.ErrPermission) {
			errs = append(errs, fmt.Errorf("remove localnet marker: %w", err))
		}
	}
	return out, errors.Join(errs...)
}

// ReleaseLocalnet undoes the localnet set-up of one interface that belongs
// to one attachment: the host veth of a chained pod behind a main plugin
// without a bridge (ptp), whose DEL would otherwise leave qoscni's guard
// (and the clsact qdisc it made) on the main plugin's veth. route_localnet
// goes back to 0 first where qoscni turned it on, then the guard, then the
// marker. An interface without our guard or marker is left alone; a bridge
// keeps its guard for the other pods behind it, so callers pass only an
// attachment's own veth.
func ReleaseLocalnet(nsFd int, dir, iface string) error {
	h, err := linkHandle(nsFd)
	if err != nil {
		return err
	}
	defer h.Close()
	idx, err := guardable(h, iface)
	if err != nil {
		return nil // gone, or no Ethernet link: nothing of ours on it
	}
	c, err := openTC(nsFd)
	if err != nil {
		return err
	}
	defer c.Close()
	path := ""
	var mk marker
	if dir != "" {
		path = markerPath(dir, iface)
		if m, err := loadMarker(path); err == nil {
			if boot, err := bootID(); err == nil && m.BootID == boot && m.IfIndex == idx {
				mk = m
			}
		}
	}
	if mk.SetRouteLocalnet {
		on, err := readRouteLocalnet(nsFd, iface)
		if err != nil {
			return err
		}
		if on {
			if err := writeRouteLocalnet(nsFd, iface, idx, false); err != nil {
				return err
			}
		}
	}
	if _, err := removeGuard(c, iface, uint32(idx), mk.CreatedClsact); err != nil {
		return err
	}
	if path != "" {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove localnet marker: %w", err)
		}
	}
	return nil
}
