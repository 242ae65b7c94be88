package portmap

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/qoscni/qoscni/internal/atomicfile"
	"github.com/qoscni/qoscni/internal/paths"
)

// Where qoscni relies on route_localnet, a marker file per interface
// says so, and whether qoscni turned the sysctl on: the agent restores the
// localnet guard on every marked interface (drift repair), and uninstall
// turns route_localnet off only where qoscni turned it on (kube-proxy, for
// one, may have set it before). The kernel state it describes lasts until
// the interface goes or the node reboots, so a marker holds the ifindex
// and the boot ID and means nothing once either differs.

// LocalnetDir is the marker directory of the networks whose records live
// in stateDir (paths.LocalnetDirOf): the plugin binary, the agent and
// uninstall derive it alike.
func LocalnetDir(stateDir string) string { return paths.LocalnetDirOf(stateDir) }

// marker is the content of <LocalnetDir>/<interface>.
type marker struct {
	IfName  string `json:"ifName"`
	IfIndex int    `json:"ifIndex"`
	BootID  string `json:"bootID"`
	// SetRouteLocalnet: it was 0 when qoscni first needed it, and qoscni
	// set it to 1.
	SetRouteLocalnet bool `json:"setRouteLocalnet"`
	// CreatedClsact: the interface had no clsact (or ingress) qdisc before
	// the guard; uninstall removes it when nothing else is on it.
	CreatedClsact bool `json:"createdClsact"`
}

func bootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("read boot ID: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func markerPath(dir, iface string) string { return filepath.Join(dir, iface) }

func loadMarker(path string) (marker, error) {
	var mk marker
	b, err := os.ReadFile(path)
	if err != nil {
		return mk, err
	}
	if err := json.Unmarshal(b, &mk); err != nil {
		return mk, fmt.Errorf("decode localnet marker %s: %w", path, err)
	}
	return mk, nil
}

// readMarkers lists a directory's markers; a missing directory has none.
// Undecodable files are returned by path so the caller can drop them.
func readMarkers(dir string) (good []marker, bad []string, err error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read localnet markers: %w", err)
	}
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue // temporary files of a writer
		}
		p := filepath.Join(dir, e.Name())
		mk, err := loadMarker(p)
		if err != nil || mk.IfName != e.Name() {
			bad = append(bad, p)
			continue
		}
		good = append(good, mk)
	}
	return good, bad, nil
}

// writeMarker puts mk in place: next to nothing (excl: fails with
// fs.ErrExist when a marker is there already) or replacing a stale one.
func writeMarker(dir string, mk marker, excl bool) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	data, err := json.Marshal(mk)
	if err != nil {
		return err
	}
	final := markerPath(dir, mk.IfName)
	// Volatile: the marker describes kernel state that a reboot takes
	// with it (its boot ID says so). Exclusive: the first writer wins.
	_, err = atomicfile.Write(final, data, atomicfile.Options{Perm: 0o600, Volatile: true, Exclusive: excl})
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("write localnet marker %s: %w", final, err)
	}
	return err
}

// claimMarker records that qoscni relies on route_localnet of mk.IfName,
// unless a valid marker says so already: that one knows better whether
// qoscni set the sysctl, since it was written before the sysctl changed.
// mk must be built from a read of the sysctl made before this call, so
// that of two ADDs racing, the one that saw 0 writes first.
func claimMarker(dir string, mk marker) error {
	for attempt := 0; attempt < 3; attempt++ {
		have, err := loadMarker(markerPath(dir, mk.IfName))
		switch {
		case errors.Is(err, fs.ErrNotExist):
			err = writeMarker(dir, mk, true)
			if errors.Is(err, fs.ErrExist) {
				continue // another ADD wrote it: read that one
			}
			return err
		case err == nil && have.BootID == mk.BootID && have.IfIndex == mk.IfIndex:
			return nil
		default:
			// From another boot, another interface of that name, or torn.
			return writeMarker(dir, mk, false)
		}
	}
	return fmt.Errorf("localnet marker of %s keeps changing", mk.IfName)
}

func linkHandle(nsFd int) (*netlink.Handle, error) {
	var h *netlink.Handle
	var err error
	if nsFd >= 0 {
		h, err = netlink.NewHandleAt(netns.NsHandle(nsFd))
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	return h, nil
}

// guardable looks up the interface the guard goes on: its program reads
// an Ethernet header.
func guardable(h *netlink.Handle, iface string) (int, error) {
	l, err := h.LinkByName(iface)
	if err != nil {
		return 0, fmt.Errorf("look up %s for route_localnet: %w", iface, err)
	}
	if t := l.Attrs().EncapType; t != "ether" {
		return 0, fmt.Errorf("route_localnet on %s: a %s link (%s), the localnet guard needs Ethernet", iface, l.Type(), t)
	}
	return l.Attrs().Index, nil
}

// ensureLocalnet turns route_localnet on for iface with both guards up
// first: the marker, then the tc guard, then the sysctl, so no moment
// exists with the sysctl on and the tc guard off (the martian chain is
// in place already: Add ensured the base ruleset).
func (m *Manager) ensureLocalnet(iface string) error {
	if err := checkIfName(iface); err != nil {
		return err
	}
	h, err := linkHandle(m.nsFd)
	if err != nil {
		return err
	}
	defer h.Close()
	idx, err := guardable(h, iface)
	if err != nil {
		return err
	}
	on, err := readRouteLocalnet(m.nsFd, iface)
	if err != nil {
		return err
	}
	c, err := openTC(m.nsFd)
	if err != nil {
		return err
	}
	defer c.Close()
	if m.localnetDir != "" {
		st, err := readGuard(c, uint32(idx))
		if err != nil {
			return err
		}
		boot, err := bootID()
		if err != nil {
			return err
		}
		if err := claimMarker(m.localnetDir, marker{IfName: iface, IfIndex: idx, BootID: boot,
			SetRouteLocalnet: !on, CreatedClsact: !st.hook}); err != nil {
			return err
		}
	}
	if _, _, err := installGuard(c, iface, uint32(idx)); err != nil {
		return err
	}
	if on {
		return nil
	}
	return writeRouteLocalnet(m.nsFd, iface, idx, true)
}

// CheckLocalnet reports how iface differs from what an ADD with IPv4
// hostPorts leaves: route_localnet on, the current localnet guard on its
// ingress hook.
func (m *Manager) CheckLocalnet(iface string) error {
	h, err := linkHandle(m.nsFd)
	if err != nil {
		return err
	}
	defer h.Close()
	idx, err := guardable(h, iface)
	if err != nil {
		return err
	}
	c, err := openTC(m.nsFd)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := readGuard(c, uint32(idx))
	if err != nil {
		return err
	}
	var problems []string
	switch {
	case st.foreign != "":
		problems = append(problems, fmt.Sprintf("tc priority %d on the ingress hook of %s is taken by a %s, not the localnet guard", guardPriority, iface, st.foreign))
	case !st.ours:
		problems = append(problems, "the localnet guard (tc ingress filter) on "+iface+" is missing")
	case !st.current:
		problems = append(problems, "the localnet guard on "+iface+" is not this version's")
	}
	if on, err := readRouteLocalnet(m.nsFd, iface); err != nil {
		problems = append(problems, err.Error())
	} else if !on {
		problems = append(problems, "route_localnet is 0 on "+iface+" (127.0.0.1:hostPort does not work)")
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}
