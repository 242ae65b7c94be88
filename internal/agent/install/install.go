package install

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/cni/netconf"
)

// PodCIDRSource returns the node's pod CIDRs (spec.podCIDRs, IPv4 and
// IPv6). NodePodCIDRs is the real one; tests inject their own.
type PodCIDRSource func(ctx context.Context) ([]string, error)

// Options of Install.
type Options struct {
	// Root is prepended to every host path ("" = "/").
	Root string
	// Mode is Standalone (default) or Chained.
	Mode Mode
	// PluginBinary is the plugin executable to copy; "" = the file named
	// PluginBinary next to the running executable.
	PluginBinary string
	// CNIBinDir and CNIConfDir are host paths ("" = the defaults).
	CNIBinDir  string
	CNIConfDir string
	// ConflistName is the standalone config file name ("" = ConflistName).
	ConflistName string
	// Config is, in standalone mode, the conflist (template) to write and,
	// in chained mode, qoscni's plugin entry; nil = the defaults.
	Config []byte
	// Primary is the chained mode's primary config file name in CNIConfDir;
	// "" = the first config file, the one the runtime uses.
	Primary string
	// WaitPrimary is how long chained mode waits for a primary config to
	// appear (the primary CNI's own installer may run after us).
	WaitPrimary time.Duration
	// PodCIDRs gives the ranges when the standalone config has none.
	PodCIDRs PodCIDRSource
	// NodeCapacity, when set, is written into qoscni's entry as
	// "nodeCapacity" (guaranteed bandwidth, docs/guarantees.md): "auto"
	// (the speed of the default route's device), one quantity for both
	// directions, or "ingress=Q,egress=Q". "" leaves the config's own.
	NodeCapacity string
	// Ceilings, when set, are written into qoscni's entry's "ceilings"
	// object over the config's keys of the same names: "key=value,..."
	// (ParseCeilings). "" leaves the config's own.
	Ceilings string
	// NetworkPolicy, in standalone mode: PolicyK8s writes "policy":
	// {"type": "k8s"} into qoscni's entry, PolicyOff removes it, "" leaves
	// the config's own. Chained mode ignores it: there the main plugin
	// owns NetworkPolicy, and qoscni refuses the key.
	NetworkPolicy string

	// Kernel: in standalone mode, also load br_netfilter and set its
	// sysctls in the node's network namespace (installBridgeNetfilter).
	Kernel bool
	// NetnsPath is the node's network namespace ("" = this process's).
	NetnsPath string
	// ProcSys is where the node's /proc/sys is seen ("" = ProcSysDir
	// under Root); ModulesDir its /lib/modules ("" = ModulesDir under
	// Root).
	ProcSys    string
	ModulesDir string
}

// Action is what happened to one file.
type Action string

const (
	Written   Action = "written"
	Unchanged Action = "unchanged"
	BackedUp  Action = "backed up"
	Restored  Action = "restored"
	Removed   Action = "removed"
	Absent    Action = "absent"
	Loaded    Action = "loaded" // a kernel module
)

// Change is one file's outcome.
type Change struct {
	Path   string // host path, without the root
	Action Action
	Detail string
}

// Report lists what Install or Uninstall did, in order.
type Report struct {
	Changes  []Change
	Warnings []string
}

// Changed reports whether anything on disk or in the kernel changed.
func (r *Report) Changed() bool {
	for _, c := range r.Changes {
		if c.Action != Unchanged && c.Action != Absent {
			return true
		}
	}
	return false
}

func (r *Report) add(path string, a Action, detail string) {
	r.Changes = append(r.Changes, Change{Path: path, Action: a, Detail: detail})
}

func (r *Report) warn(format string, args ...any) {
	r.Warnings = append(r.Warnings, fmt.Sprintf(format, args...))
}

// hostPaths resolves host paths under a root.
type hostPaths struct{ root string }

func (h hostPaths) abs(p string) string { return filepath.Join(h.root, p) }

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// Install puts the plugin binary and the network config in place. The
// binary goes first, so the runtime never finds a config whose plugin is
// missing; in standalone mode br_netfilter comes before the config, so
// the first pods find it. Running it again with the same inputs changes
// nothing.
func Install(ctx context.Context, o Options) (*Report, error) {
	h := hostPaths{root: orDefault(o.Root, "/")}
	binDir := orDefault(o.CNIBinDir, CNIBinDir)
	confDir := orDefault(o.CNIConfDir, CNIConfDir)
	rep := &Report{}

	src := o.PluginBinary
	if src == "" {
		exe, err := os.Executable()
		if err != nil {
			return rep, fmt.Errorf("find the plugin binary: %w", err)
		}
		src = filepath.Join(filepath.Dir(exe), PluginBinary)
	}
	if err := installBinary(h, src, filepath.Join(binDir, PluginBinary), rep); err != nil {
		return rep, err
	}

	switch o.Mode {
	case Standalone, "":
		if o.Kernel {
			if err := installBridgeNetfilter(h, o, rep); err != nil {
				return rep, err
			}
		}
		return rep, installStandalone(ctx, h, confDir, o, rep)
	case Chained:
		return rep, installChained(ctx, h, confDir, o, rep)
	default:
		return rep, fmt.Errorf("unknown mode %q (want %s or %s)", o.Mode, Standalone, Chained)
	}
}

func installBinary(h hostPaths, src, dst string, rep *Report) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("open plugin binary: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat plugin binary: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("plugin binary %s is not a regular file", src)
	}
	changed, err := copyAtomic(h.abs(dst), f, st.Size(), 0o755)
	if err != nil {
		return fmt.Errorf("install plugin binary %s: %w", dst, err)
	}
	rep.add(dst, action(changed), "from "+src)
	return nil
}

func action(changed bool) Action {
	if changed {
		return Written
	}
	return Unchanged
}

// nodeSettings are what the install writes into qoscni's entry over the
// config's own: the node's capacity, the ceilings and, in standalone mode,
// NetworkPolicy enforcement.
type nodeSettings struct {
	capacity *NodeCapacity // nil: the config's own
	ceilings netconf.CeilingsConfig
	policy   string // PolicyOwn in chained mode
}

func (s nodeSettings) apply(entry object) {
	setCapacity(entry, s.capacity)
	setCeilings(entry, s.ceilings)
	setPolicy(entry, s.policy)
}

// settingsFor resolves o.NodeCapacity and o.Ceilings, and notes where an
// automatic capacity came from.
func settingsFor(o Options, rep *Report) (nodeSettings, error) {
	ceil, err := ParseCeilings(o.Ceilings)
	if err != nil {
		return nodeSettings{}, err
	}
	policy, err := ParseNetworkPolicy(o.NetworkPolicy)
	if err != nil {
		return nodeSettings{}, err
	}
	if o.Mode == Chained {
		policy = PolicyOwn
	}
	c, dev, err := resolveCapacity(o.NodeCapacity, o.NetnsPath)
	if err != nil {
		return nodeSettings{}, err
	}
	if dev != "" {
		rep.add("nodeCapacity", Written, fmt.Sprintf("%s bit/s each way: %d %% of the speed the kernel reports for %s", c.Ingress, AutoCapacityPercent, dev))
	}
	return nodeSettings{capacity: c, ceilings: ceil, policy: policy}, nil
}

func installStandalone(ctx context.Context, h hostPaths, confDir string, o Options, rep *Report) error {
	tmpl := o.Config
	if tmpl == nil {
		tmpl = DefaultStandaloneConflist
	}
	settings, err := settingsFor(o, rep)
	if err != nil {
		return err
	}
	data, err := renderStandalone(tmpl, settings, func() ([]string, error) {
		if o.PodCIDRs == nil {
			return nil, errors.New("the config sets no ipam.ranges and there is no node to read spec.podCIDRs from (set " + NodeNameEnv + " or --pod-cidrs)")
		}
		cidrs, err := o.PodCIDRs(ctx)
		if err != nil {
			return nil, fmt.Errorf("read the node's pod CIDRs: %w", err)
		}
		return cidrs, nil
	})
	if err != nil {
		return err
	}
	name := orDefault(o.ConflistName, ConflistName)
	dst := filepath.Join(confDir, name)
	changed, err := writeAtomic(h.abs(dst), data, 0o644)
	if err != nil {
		return fmt.Errorf("write network config %s: %w", dst, err)
	}
	rep.add(dst, action(changed), "standalone")
	// The runtime uses the first config file by name.
	files, err := configFiles(h.abs(confDir))
	if err != nil {
		return err
	}
	if len(files) > 0 && files[0] != name {
		rep.warn("%s sorts before %s: the runtime uses it, not qoscni", filepath.Join(confDir, files[0]), dst)
	}
	return nil
}

// configFiles lists the names the runtime would load, in libcni's order.
func configFiles(dir string) ([]string, error) {
	names, err := cniconf.ConfigFiles(dir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", dir, err)
	}
	return names, nil
}

func findPrimary(ctx context.Context, h hostPaths, confDir string, o Options) (string, error) {
	own := orDefault(o.ConflistName, ConflistName)
	deadline := time.Now().Add(o.WaitPrimary)
	for {
		files, err := configFiles(h.abs(confDir))
		if err != nil {
			return "", err
		}
		if o.Primary != "" {
			if slices.Contains(files, o.Primary) {
				return o.Primary, nil
			}
		} else {
			for _, f := range files {
				if f != own {
					return f, nil
				}
			}
		}
		if !time.Now().Before(deadline) {
			what := "no primary CNI config"
			if o.Primary != "" {
				what = "primary CNI config " + o.Primary + " not found"
			}
			return "", fmt.Errorf("chained mode: %s in %s (install the primary CNI first, or wait longer)", what, confDir)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func installChained(ctx context.Context, h hostPaths, confDir string, o Options, rep *Report) error {
	entryData := o.Config
	if entryData == nil {
		entryData = DefaultChainedPlugin
	}
	entry, err := parseEntry(entryData)
	if err != nil {
		return err
	}
	settings, err := settingsFor(o, rep)
	if err != nil {
		return err
	}
	settings.apply(entry)
	name, err := findPrimary(ctx, h, confDir, o)
	if err != nil {
		return err
	}
	primary := filepath.Join(confDir, name)
	orig, err := os.ReadFile(h.abs(primary))
	if err != nil {
		return fmt.Errorf("read primary config: %w", err)
	}
	out, dropped, err := chain(orig, entry)
	if err == nil {
		err = checkEntry(out)
	}
	if err != nil {
		return fmt.Errorf("chain qoscni into %s: %w", primary, err)
	}
	detail := "qoscni appended"
	if len(dropped) > 0 {
		detail += ", replacing " + strings.Join(dropped, ", ")
	}
	pf, _ := cniconf.Decode(primary, orig) // chain decoded it already
	backup := primary + BackupSuffix
	if pf.List {
		// The backup is the config as the primary CNI wrote it: taken
		// whenever the file has no qoscni entry, so a primary that rewrote
		// its file since the last install is backed up afresh.
		if !hasQoscni(orig) {
			if _, err := writeAtomic(h.abs(backup), orig, 0o644); err != nil {
				return fmt.Errorf("back up %s: %w", primary, err)
			}
			rep.add(backup, BackedUp, "original of "+primary)
		}
		changed, err := writeAtomic(h.abs(primary), out, 0o644)
		if err != nil {
			return fmt.Errorf("write %s: %w", primary, err)
		}
		rep.add(primary, action(changed), detail)
		return nil
	}
	// A single plugin config: the runtime reads a .conflist of the same
	// name instead, and the .conf moves to its backup name. The conflist
	// is complete before the .conf goes, so the runtime finds one of them
	// at every moment (".conf" sorts before ".conflist").
	target := strings.TrimSuffix(primary, filepath.Ext(primary)) + ".conflist"
	changed, err := writeAtomic(h.abs(target), out, 0o644)
	if err != nil {
		return fmt.Errorf("write %s: %w", target, err)
	}
	rep.add(target, action(changed), detail+" (converted from "+name+")")
	if err := renameAtomic(h.abs(primary), h.abs(backup)); err != nil {
		return fmt.Errorf("back up %s: %w", primary, err)
	}
	rep.add(backup, BackedUp, "original of "+primary)
	return nil
}
