package install

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/sysctl"
)

// installBridgeNetfilter makes the node pass the traffic of qoscni's bridge
// to iptables (podnet.BridgeNetfilter says why): it loads br_netfilter
// when its sysctls are missing, then sets both to 1 in the node's
// namespace. Standalone mode only: behind another main plugin the bridge,
// if any, is that plugin's.
//
// What cannot be done is a warning in the report, not a failed install:
// the plugin's STATUS and ADD and the agent's /readyz then fail with the
// message that says what to do, where an operator looks (the node's
// NetworkReady condition, the pod's events, the DaemonSet's readiness),
// while the rest of qoscni is in place the moment the module is. A
// failing init container would only restart, its message in a log.
func installBridgeNetfilter(h hostPaths, o Options, rep *Report) error {
	tree := sysctl.Tree(orDefault(o.ProcSys, h.abs(ProcSysDir)))
	// Without the host's /proc/sys/net mounted, every sysctl would look
	// missing and the module loaded for nothing. net/core is in every
	// namespace's, and not in an empty directory left as a mountpoint.
	if _, err := os.Stat(filepath.Join(string(tree), "net", "core")); err != nil {
		rep.warn("br_netfilter left alone: the node's %s is not at %s (%v)", ProcSysNetDir, filepath.Join(string(tree), "net"), err)
		return nil
	}
	fd := sysctl.Current
	if o.NetnsPath != "" {
		f, err := unix.Open(o.NetnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open netns %s: %w", o.NetnsPath, err)
		}
		defer unix.Close(f)
		fd = f
	}
	b := podnet.BridgeNetfilter{ProcSys: tree, NetnsFd: fd}
	if _, err := tree.Get(fd, podnet.BridgeNFCallIPTables); errors.Is(err, fs.ErrNotExist) {
		loadBridgeNetfilter(orDefault(o.ModulesDir, h.abs(ModulesDir)), rep)
	}
	found, err := b.Ensure()
	for _, s := range found {
		if s.Changed() {
			rep.add("sysctl "+s.Name, Written, "1, was "+s.Was)
		} else {
			rep.add("sysctl "+s.Name, Unchanged, "1")
		}
	}
	if err != nil {
		rep.warn("%v", err)
	}
	return nil
}

// loadBridgeNetfilter loads the module and what it depends on. A failure
// is reported by the sysctl check that follows, in the words the plugin
// uses; the reason the load failed goes before it.
func loadBridgeNetfilter(modulesDir string, rep *Report) {
	l, err := newModuleLoader(modulesDir)
	if err == nil {
		var loaded []string
		loaded, err = l.load(podnet.BridgeNetfilterModule)
		for _, f := range loaded {
			if !filepath.IsAbs(f) {
				f = filepath.Join(ModulesDir, filepath.Base(l.dir), f)
			}
			rep.add("module "+moduleName(f), Loaded, f)
		}
	}
	if err != nil {
		rep.warn("%v", err)
	}
}
