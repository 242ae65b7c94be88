package node

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// privateDirs are the host directories the node's programs write, whatever
// their own root and state flags say: each is covered by an empty tmpfs in
// the node's mount namespace.
var privateDirs = []string{
	"/opt/cni/bin",   // the DaemonSet's install step (hostPath)
	"/etc/cni/net.d", // idem
	"/var/lib/cni",   // plugin state, IPAM, journal (hostPath)
	"/run/containerd",
	"/var/lib/containerd",
	"/etc/containerd",
	"/var/lib/kubelet", // written also with another --root-dir
	"/var/log/pods",
	"/var/log/containers",
	// The standalone DaemonSet mounts it (DirectoryOrCreate) to load
	// br_netfilter; a machine without modules has none.
	"/lib/modules",
}

// privateFiles are global (not per network namespace) sysctls the kubelet
// sets at start: each is covered by a private copy holding its current
// value, so the kubelet's writes go nowhere.
var privateFiles = []string{
	"/proc/sys/kernel/panic",
	"/proc/sys/kernel/panic_on_oops",
	"/proc/sys/kernel/keys/root_maxkeys",
	"/proc/sys/kernel/keys/root_maxbytes",
	"/proc/sys/vm/overcommit_memory",
	"/proc/sys/vm/panic_on_oom",
}

// createdMark marks a host directory an e2e run created to mount over, so
// that whichever run ends last removes it (runs of several e2e packages can
// overlap, and a directory removed under another run's mount detaches
// that mount, emptying its /opt/cni/bin mid-test).
const createdMark = ".qoscni-e2e-created"

// makeMountpoints creates the private directories that the host does not
// have (a mount needs its mountpoint), marking each directory it made.
func makeMountpoints() ([]string, error) {
	var made []string
	for _, d := range privateDirs {
		if _, err := os.Stat(d); err == nil {
			continue
		}
		missing := d
		for {
			parent := filepath.Dir(missing)
			if _, err := os.Stat(parent); err == nil || parent == missing {
				break
			}
			missing = parent
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return made, err
		}
		for p := d; ; p = filepath.Dir(p) {
			if err := os.WriteFile(filepath.Join(p, createdMark), nil, 0o644); err != nil {
				return made, err
			}
			made = append(made, p)
			if p == missing {
				break
			}
		}
	}
	return made, nil
}

// removeMountpoints removes the marked directories (made by this run or an
// earlier one) that no other mount namespace mounts on or under, deepest
// first; one in use stays for the run using it to remove.
func removeMountpoints(_ []string) {
	var marked []string
	for _, d := range privateDirs {
		for p := d; p != "/" && p != "."; p = filepath.Dir(p) {
			if _, err := os.Stat(filepath.Join(p, createdMark)); err == nil && !slices.Contains(marked, p) {
				marked = append(marked, p)
			}
		}
	}
	slices.SortFunc(marked, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	used := mountedElsewhere()
	for _, d := range marked {
		if slices.ContainsFunc(used, func(m string) bool { return m == d || strings.HasPrefix(m, d+"/") }) {
			continue
		}
		_ = os.Remove(filepath.Join(d, createdMark))
		_ = os.Remove(d)
	}
}

// mountedElsewhere lists the mount points of every mount namespace but
// this process's.
func mountedElsewhere() []string {
	self, _ := os.Readlink("/proc/self/ns/mnt")
	seen := map[string]bool{self: true}
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		ns, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "mnt"))
		if err != nil || seen[ns] {
			continue
		}
		seen[ns] = true
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "mountinfo"))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 4 {
				out = append(out, f[4])
			}
		}
	}
	return out
}

// coverHostPaths runs in the child, in its own mount namespace (a slave of
// the host's: host mounts still show, its own never leave it). keep are
// the namespaces of /run/netns it still needs (the node's and the
// client's).
func coverHostPaths(keep ...string) error {
	for _, d := range privateDirs {
		if err := syscall.Mount("qoscni-e2e", d, "tmpfs", syscall.MS_NODEV|syscall.MS_NOSUID, "mode=0755"); err != nil {
			return fmt.Errorf("cover %s: %w", d, err)
		}
	}
	// The copies live in one of the tmpfs above (containerd gets its
	// config by flag, so /etc/containerd is otherwise unused).
	scratch := "/etc/containerd/qoscni-e2e-sysctl"
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		return err
	}
	for i, f := range privateFiles {
		v, err := os.ReadFile(f)
		if err != nil {
			if os.IsNotExist(err) {
				continue
			}
			return err
		}
		copyPath := filepath.Join(scratch, strconv.Itoa(i))
		if err := os.WriteFile(copyPath, bytes.TrimSpace(v), 0o644); err != nil {
			return err
		}
		if err := syscall.Mount(copyPath, f, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("cover %s: %w", f, err)
		}
	}
	// /run/netns: containerd creates a file here for every pod namespace
	// and binds the namespace onto it. A bind of the host's directory would
	// keep the bind mounts private but not the files, which would outlive
	// a containerd that never removed them: so a tmpfs, holding only the
	// node's and the client's namespaces (bound from the host's files),
	// and shared within this mount namespace, so that the pod namespaces
	// made later reach the agent's container (mountPropagation:
	// HostToContainer).
	hostNetns := "/etc/containerd/qoscni-e2e-host-netns"
	if err := os.MkdirAll(hostNetns, 0o700); err != nil {
		return err
	}
	if err := syscall.Mount("/run/netns", hostNetns, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("bind the host's /run/netns: %w", err)
	}
	if err := syscall.Mount("qoscni-e2e", "/run/netns", "tmpfs", syscall.MS_NODEV|syscall.MS_NOSUID|syscall.MS_NOEXEC, "mode=0755"); err != nil {
		return fmt.Errorf("cover /run/netns: %w", err)
	}
	for _, name := range keep {
		f := filepath.Join("/run/netns", name)
		if err := os.WriteFile(f, nil, 0o444); err != nil {
			return err
		}
		if err := syscall.Mount(filepath.Join(hostNetns, name), f, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind netns %s: %w", name, err)
		}
	}
	if err := syscall.Mount("", "/run/netns", "", syscall.MS_SHARED, ""); err != nil {
		return fmt.Errorf("share /run/netns: %w", err)
	}
	return nil
}

// killNamespace kills every process still in the network namespace whose
// file is nsPath (containerd shims and containers daemonize away from the
// test's process tree), and waits up to 5 s for them to go.
func killNamespace(nsPath string) {
	var st syscall.Stat_t
	if err := syscall.Stat(nsPath, &st); err != nil {
		return
	}
	want := fmt.Sprintf("net:[%d]", st.Ino)
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left int
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			link, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "net"))
			if err != nil || !strings.EqualFold(link, want) {
				continue
			}
			left++
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if left == 0 || time.Now().After(deadline) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}
