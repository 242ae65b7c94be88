package install

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/state"
)

// UninstallOptions of Uninstall.
type UninstallOptions struct {
	// Root is prepended to every host path ("" = "/").
	Root string
	// CNIBinDir, CNIConfDir and StateDir are host paths ("" = defaults).
	CNIBinDir  string
	CNIConfDir string
	StateDir   string
	// ConflistName is the standalone config file name ("" = ConflistName).
	ConflistName string
	// KeepBinary leaves the plugin binary, so the runtime can still run
	// DEL for pods qoscni wired (see docs/install.md).
	KeepBinary bool
	// Kernel also removes qoscni's kernel objects: shaping on host veths,
	// every IFB it created, the localnet guards and its nftables table;
	// route_localnet goes back to 0 where qoscni set it (the markers
	// beside StateDir say where).
	Kernel bool
	// NetnsPath is the node's network namespace ("" = the current one).
	NetnsPath string
}

// Uninstall takes qoscni off the node: first the network config (no new
// pod is wired by qoscni), then the kernel objects, then the binary.
// Pods keep their addresses, routes and (chained mode) the primary CNI's
// wiring; what they lose is described in docs/install.md. Idempotent.
func Uninstall(ctx context.Context, o UninstallOptions) (*Report, error) {
	h := hostPaths{root: orDefault(o.Root, "/")}
	confDir := orDefault(o.CNIConfDir, CNIConfDir)
	rep := &Report{}
	var errs []error
	// Every qoscni network's state directory, read before the config that
	// names some of them goes: the records and localnet markers there say
	// what qoscni did to the kernel.
	var stateDirs []string
	if o.Kernel {
		stateDirs = uninstallStateDirs(h, confDir, orDefault(o.StateDir, StateDir))
	}
	if err := uninstallConfig(h, confDir, orDefault(o.ConflistName, ConflistName), rep); err != nil {
		errs = append(errs, err)
	}
	if o.Kernel {
		if err := cleanKernel(ctx, stateDirs, o.NetnsPath, rep); err != nil {
			errs = append(errs, err)
		}
	}
	if !o.KeepBinary {
		bin := filepath.Join(orDefault(o.CNIBinDir, CNIBinDir), PluginBinary)
		removed, err := removeFile(h.abs(bin))
		if err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", bin, err))
		} else {
			rep.add(bin, removedOrAbsent(removed), "")
		}
	}
	return rep, errors.Join(errs...)
}

func removedOrAbsent(removed bool) Action {
	if removed {
		return Removed
	}
	return Absent
}

func uninstallConfig(h hostPaths, confDir, own string, rep *Report) error {
	dir := h.abs(confDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", confDir, err)
	}
	var errs []error
	// Chained mode's backups first: each gives back the primary's config
	// as the primary CNI wrote it (with bandwidth/portmap, if it had them).
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), BackupSuffix) {
			continue
		}
		if err := restoreBackup(h, confDir, e.Name(), rep); err != nil {
			errs = append(errs, err)
		}
	}
	// Then any config still naming qoscni: ours is removed, an entry in
	// someone else's conflist (no backup, or a backup lost) is taken out.
	files, err := configFiles(dir)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, name := range files {
		p := filepath.Join(confDir, name)
		data, err := os.ReadFile(h.abs(p))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		f, err := cniconf.Decode(p, data)
		if err != nil || !f.HasQoscni() {
			continue
		}
		out, empty, err := unchain(data)
		if err != nil {
			errs = append(errs, fmt.Errorf("remove qoscni from %s: %w", p, err))
			continue
		}
		if empty || name == own || f.MainIsQoscni() {
			if _, err := removeFile(h.abs(p)); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", p, err))
				continue
			}
			rep.add(p, Removed, "")
			continue
		}
		if _, err := writeAtomic(h.abs(p), out, 0o644); err != nil {
			errs = append(errs, fmt.Errorf("write %s: %w", p, err))
			continue
		}
		rep.add(p, Written, "qoscni entry removed")
	}
	return errors.Join(errs...)
}

func restoreBackup(h hostPaths, confDir, backupName string, rep *Report) error {
	backup := filepath.Join(confDir, backupName)
	orig := strings.TrimSuffix(backup, BackupSuffix)
	// A converted single plugin config: ours is the .conflist beside it.
	if ext := filepath.Ext(orig); ext == ".conf" || ext == ".json" {
		converted := strings.TrimSuffix(orig, ext) + ".conflist"
		if data, err := os.ReadFile(h.abs(converted)); err == nil && hasQoscni(data) {
			if _, err := os.Stat(h.abs(orig)); err == nil {
				// The primary wrote its .conf again: it is the newer one.
				if _, err := removeFile(h.abs(backup)); err != nil {
					return err
				}
				rep.add(backup, Removed, orig+" was rewritten by its owner")
			} else {
				if err := renameAtomic(h.abs(backup), h.abs(orig)); err != nil {
					return fmt.Errorf("restore %s: %w", orig, err)
				}
				rep.add(orig, Restored, "from "+backup)
			}
			if _, err := removeFile(h.abs(converted)); err != nil {
				return fmt.Errorf("remove %s: %w", converted, err)
			}
			rep.add(converted, Removed, "")
			return nil
		}
	}
	cur, err := os.ReadFile(h.abs(orig))
	if err == nil && hasQoscni(cur) {
		if err := renameAtomic(h.abs(backup), h.abs(orig)); err != nil {
			return fmt.Errorf("restore %s: %w", orig, err)
		}
		rep.add(orig, Restored, "from "+backup)
		return nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read %s: %w", orig, err)
	}
	// The primary rewrote its config (or removed it) since: ours is stale.
	if _, err := removeFile(h.abs(backup)); err != nil {
		return fmt.Errorf("remove %s: %w", backup, err)
	}
	rep.add(backup, Removed, "stale: "+orig+" no longer has qoscni")
	return nil
}

// uninstallStateDirs lists, as paths under the host root, the state
// directories of every qoscni network the agent would read: the given
// one, those the conflists name and those the plugin registered. A
// directory the listing cannot read is skipped (the given one never is).
func uninstallStateDirs(h hostPaths, confDir, own string) []string {
	conf, _ := cniconf.StateDirs(h.abs(confDir))
	reg, _ := state.RegisteredDirs(h.abs(state.DefaultRegistryDir))
	out := []string{h.abs(own)}
	for _, d := range append(conf, reg...) {
		// Conflists and the registry name host paths.
		if d = h.abs(d); !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}
