package install

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

// node is a temporary root with a plugin binary to install.
type node struct {
	t    *testing.T
	root string
	bin  string // source plugin binary
}

func newNode(t *testing.T) *node {
	t.Helper()
	n := &node{t: t, root: t.TempDir()}
	n.bin = filepath.Join(t.TempDir(), PluginBinary)
	n.setBinary("#!/bin/sh\necho v1\n")
	return n
}

func (n *node) setBinary(content string) {
	n.t.Helper()
	if err := os.WriteFile(n.bin, []byte(content), 0o755); err != nil {
		n.t.Fatal(err)
	}
}

func (n *node) path(p string) string { return filepath.Join(n.root, p) }

func (n *node) read(p string) []byte {
	n.t.Helper()
	b, err := os.ReadFile(n.path(p))
	if err != nil {
		n.t.Fatal(err)
	}
	return b
}

func (n *node) exists(p string) bool {
	_, err := os.Stat(n.path(p))
	return err == nil
}

// put copies a testdata file into the node's CNI config dir.
func (n *node) put(name string) []byte {
	n.t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		n.t.Fatal(err)
	}
	if err := os.MkdirAll(n.path(CNIConfDir), 0o755); err != nil {
		n.t.Fatal(err)
	}
	if err := os.WriteFile(n.path(filepath.Join(CNIConfDir, name)), b, 0o644); err != nil {
		n.t.Fatal(err)
	}
	return b
}

func (n *node) install(o Options) *Report {
	n.t.Helper()
	o.Root = n.root
	o.PluginBinary = n.bin
	rep, err := Install(context.Background(), o)
	if err != nil {
		n.t.Fatalf("install: %v", err)
	}
	n.noTempFiles()
	return rep
}

func (n *node) uninstall() *Report {
	n.t.Helper()
	rep, err := Uninstall(context.Background(), UninstallOptions{Root: n.root})
	if err != nil {
		n.t.Fatalf("uninstall: %v", err)
	}
	n.noTempFiles()
	return rep
}

// noTempFiles: every write went through a rename, nothing half-done stays.
func (n *node) noTempFiles() {
	n.t.Helper()
	_ = filepath.Walk(n.root, func(p string, info os.FileInfo, err error) error {
		if err == nil && strings.Contains(filepath.Base(p), ".tmp-") {
			n.t.Errorf("temporary file left: %s", p)
		}
		return nil
	})
}

// confDirFiles lists the config dir (all files, backups included).
func (n *node) confDirFiles() []string {
	n.t.Helper()
	entries, err := os.ReadDir(n.path(CNIConfDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		n.t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func cidrs(list ...string) PodCIDRSource {
	return func(context.Context) ([]string, error) { return list, nil }
}

func actions(rep *Report) map[string]Action {
	m := map[string]Action{}
	for _, c := range rep.Changes {
		m[c.Path] = c.Action
	}
	return m
}

func mustUnchanged(t *testing.T, rep *Report) {
	t.Helper()
	if rep.Changed() {
		t.Fatalf("re-run changed something: %+v", rep.Changes)
	}
}

// pluginTypes loads a conflist as libcni (the runtime) does.
func pluginTypes(t *testing.T, data []byte) []string {
	t.Helper()
	l, err := libcni.ConfListFromBytes(data)
	if err != nil {
		t.Fatalf("libcni cannot load the config: %v\n%s", err, data)
	}
	var types []string
	for _, p := range l.Plugins {
		types = append(types, p.Network.Type)
	}
	return types
}

var (
	binPath  = filepath.Join(CNIBinDir, PluginBinary)
	confPath = filepath.Join(CNIConfDir, ConflistName)
)

func TestStandaloneFreshInstall(t *testing.T) {
	n := newNode(t)
	rep := n.install(Options{PodCIDRs: cidrs("10.244.1.0/24", "fd00:10:244:1::/64")})
	a := actions(rep)
	if a[binPath] != Written || a[confPath] != Written {
		t.Fatalf("want binary and conflist written, got %+v", rep.Changes)
	}
	if got := string(n.read(binPath)); got != "#!/bin/sh\necho v1\n" {
		t.Fatalf("binary content %q", got)
	}
	if st, _ := os.Stat(n.path(binPath)); st.Mode().Perm() != 0o755 {
		t.Fatalf("binary mode %v", st.Mode())
	}
	data := n.read(confPath)
	if got := pluginTypes(t, data); !slices.Equal(got, []string{"qoscni"}) {
		t.Fatalf("plugins %v", got)
	}
	// The plugin accepts the config: ranges are the node's podCIDRs.
	conf := installedConf(t, data)
	var got []string
	for _, set := range conf.IPAMConfig.Ranges {
		for _, r := range set {
			sn := net.IPNet(r.Subnet)
			got = append(got, sn.String())
		}
	}
	if !slices.Equal(got, []string{"10.244.1.0/24", "fd00:10:244:1::/64"}) {
		t.Fatalf("ranges %v", got)
	}
	if conf.StateDir != StateDir {
		t.Fatalf("stateDir %q", conf.StateDir)
	}
}

func TestStandaloneReinstallIsIdempotent(t *testing.T) {
	n := newNode(t)
	o := Options{PodCIDRs: cidrs("10.244.1.0/24")}
	n.install(o)
	before, _ := os.Stat(n.path(confPath))
	mustUnchanged(t, n.install(o))
	after, _ := os.Stat(n.path(confPath))
	if !os.SameFile(before, after) {
		t.Fatal("conflist was replaced although unchanged")
	}
	// A new plugin binary is replaced (atomically: a new inode).
	oldBin, _ := os.Stat(n.path(binPath))
	n.setBinary("#!/bin/sh\necho v2\n")
	rep := n.install(o)
	if a := actions(rep); a[binPath] != Written || a[confPath] != Unchanged {
		t.Fatalf("upgrade: %+v", rep.Changes)
	}
	newBin, _ := os.Stat(n.path(binPath))
	if os.SameFile(oldBin, newBin) {
		t.Fatal("binary rewritten in place, not renamed over")
	}
	if got := string(n.read(binPath)); !strings.Contains(got, "v2") {
		t.Fatalf("binary not upgraded: %q", got)
	}
}

func TestStandaloneConfiguredRangesWin(t *testing.T) {
	n := newNode(t)
	tmpl := bytes.Replace(DefaultStandaloneConflist, []byte(`"dataDir"`),
		[]byte(`"ranges": [[{"subnet": "10.22.0.0/16"}]], "dataDir"`), 1)
	n.install(Options{Config: tmpl, PodCIDRs: func(context.Context) ([]string, error) {
		t.Fatal("the Node was read although the config has ranges")
		return nil, nil
	}})
	if !bytes.Contains(n.read(confPath), []byte("10.22.0.0/16")) {
		t.Fatalf("configured range lost:\n%s", n.read(confPath))
	}
}

func TestStandaloneNeedsRanges(t *testing.T) {
	n := newNode(t)
	for name, src := range map[string]PodCIDRSource{
		"no source": nil,
		"no cidrs":  cidrs(),
		"api error": func(context.Context) ([]string, error) { return nil, errors.New("forbidden") },
	} {
		_, err := Install(context.Background(), Options{Root: n.root, PluginBinary: n.bin, PodCIDRs: src})
		if err == nil {
			t.Errorf("%s: install succeeded without ranges", name)
		}
		if n.exists(confPath) {
			t.Fatalf("%s: conflist written without ranges", name)
		}
	}
}

func TestStandaloneUninstall(t *testing.T) {
	n := newNode(t)
	n.install(Options{PodCIDRs: cidrs("10.244.1.0/24")})
	rep := n.uninstall()
	if a := actions(rep); a[binPath] != Removed || a[confPath] != Removed {
		t.Fatalf("uninstall: %+v", rep.Changes)
	}
	if n.exists(binPath) || n.exists(confPath) {
		t.Fatal("files left after uninstall")
	}
	mustUnchanged(t, n.uninstall())
}

func TestChainedFlannel(t *testing.T) {
	n := newNode(t)
	orig := n.put("10-flannel.conflist")
	primary := filepath.Join(CNIConfDir, "10-flannel.conflist")
	backup := primary + BackupSuffix
	rep := n.install(Options{Mode: Chained})
	if a := actions(rep); a[primary] != Written || a[backup] != BackedUp {
		t.Fatalf("chained install: %+v", rep.Changes)
	}
	if got := pluginTypes(t, n.read(primary)); !slices.Equal(got, []string{"flannel", "qoscni"}) {
		t.Fatalf("plugins %v (portmap must be replaced)", got)
	}
	if !bytes.Equal(n.read(backup), orig) {
		t.Fatal("backup differs from the original")
	}
	// The flannel entry is kept as it was.
	if !bytes.Contains(n.read(primary), []byte(`"isDefaultGateway": true`)) {
		t.Fatalf("flannel delegate config lost:\n%s", n.read(primary))
	}
	if n.exists(confPath) {
		t.Fatal("chained mode wrote a standalone conflist")
	}
	mustUnchanged(t, n.install(Options{Mode: Chained}))
	if !bytes.Equal(n.read(backup), orig) {
		t.Fatal("re-install replaced the backup with the chained config")
	}

	n.uninstall()
	if !bytes.Equal(n.read(primary), orig) {
		t.Fatalf("uninstall did not restore the original:\n%s", n.read(primary))
	}
	if got := n.confDirFiles(); !slices.Equal(got, []string{"10-flannel.conflist"}) {
		t.Fatalf("config dir after uninstall: %v", got)
	}
}

func TestChainedCalico(t *testing.T) {
	n := newNode(t)
	orig := n.put("10-calico.conflist")
	primary := filepath.Join(CNIConfDir, "10-calico.conflist")
	rep := n.install(Options{Mode: Chained})
	if got := pluginTypes(t, n.read(primary)); !slices.Equal(got, []string{"calico", "qoscni"}) {
		t.Fatalf("plugins %v (portmap and bandwidth must be replaced)", got)
	}
	var detail string
	for _, c := range rep.Changes {
		if c.Path == primary {
			detail = c.Detail
		}
	}
	if !strings.Contains(detail, "portmap") || !strings.Contains(detail, "bandwidth") {
		t.Fatalf("report does not say what was replaced: %q", detail)
	}
	// qoscni takes over their capabilities.
	l, _ := libcni.ConfListFromBytes(n.read(primary))
	var q struct {
		Capabilities map[string]bool `json:"capabilities"`
	}
	_ = json.Unmarshal(l.Plugins[1].Bytes, &q)
	for _, c := range []string{"bandwidth", "portMappings", "io.kubernetes.cri.pod-annotations"} {
		if !q.Capabilities[c] {
			t.Errorf("qoscni entry lacks capability %s", c)
		}
	}
	mustUnchanged(t, n.install(Options{Mode: Chained}))

	// Calico's installer rewrites its file when its pod restarts: the next
	// install chains again and backs up the new original.
	rewritten := bytes.Replace(orig, []byte(`"info"`), []byte(`"debug"`), 1)
	if err := os.WriteFile(n.path(primary), rewritten, 0o644); err != nil {
		t.Fatal(err)
	}
	n.install(Options{Mode: Chained})
	if !bytes.Equal(n.read(primary+BackupSuffix), rewritten) {
		t.Fatal("backup not refreshed from the rewritten primary")
	}
	n.uninstall()
	if !bytes.Equal(n.read(primary), rewritten) {
		t.Fatal("uninstall did not restore the latest original")
	}
	if n.exists(primary + BackupSuffix) {
		t.Fatal("backup left")
	}
}

func TestChainedSingleConf(t *testing.T) {
	n := newNode(t)
	orig := n.put("10-bridge.conf")
	conf := filepath.Join(CNIConfDir, "10-bridge.conf")
	list := filepath.Join(CNIConfDir, "10-bridge.conflist")
	n.install(Options{Mode: Chained})
	if got := pluginTypes(t, n.read(list)); !slices.Equal(got, []string{"bridge", "qoscni"}) {
		t.Fatalf("plugins %v", got)
	}
	if n.exists(conf) || !bytes.Equal(n.read(conf+BackupSuffix), orig) {
		t.Fatal("the .conf must move to its backup, unchanged")
	}
	mustUnchanged(t, n.install(Options{Mode: Chained}))
	n.uninstall()
	if !bytes.Equal(n.read(conf), orig) {
		t.Fatal(".conf not restored")
	}
	if got := n.confDirFiles(); !slices.Equal(got, []string{"10-bridge.conf"}) {
		t.Fatalf("config dir after uninstall: %v", got)
	}
}

func TestChainedPrimaryChoice(t *testing.T) {
	n := newNode(t)
	// No primary: an error, not a standalone install.
	_, err := Install(context.Background(), Options{Root: n.root, PluginBinary: n.bin, Mode: Chained})
	if err == nil || !strings.Contains(err.Error(), "no primary") {
		t.Fatalf("want a missing-primary error, got %v", err)
	}
	// The first file by name is the one the runtime uses.
	n.put("10-flannel.conflist")
	n.put("10-calico.conflist")
	n.install(Options{Mode: Chained})
	if !hasQoscni(n.read(filepath.Join(CNIConfDir, "10-calico.conflist"))) ||
		hasQoscni(n.read(filepath.Join(CNIConfDir, "10-flannel.conflist"))) {
		t.Fatal("chained into the wrong file")
	}
	// Unless one is named.
	n.install(Options{Mode: Chained, Primary: "10-flannel.conflist"})
	if !hasQoscni(n.read(filepath.Join(CNIConfDir, "10-flannel.conflist"))) {
		t.Fatal("--primary ignored")
	}
	n.uninstall()
	for _, f := range []string{"10-calico.conflist", "10-flannel.conflist"} {
		if hasQoscni(n.read(filepath.Join(CNIConfDir, f))) {
			t.Fatalf("%s still has qoscni", f)
		}
	}
}

func TestChainedWaitsForPrimary(t *testing.T) {
	n := newNode(t)
	done := make(chan error, 1)
	go func() {
		_, err := Install(context.Background(), Options{Root: n.root, PluginBinary: n.bin, Mode: Chained, WaitPrimary: 30e9})
		done <- err
	}()
	n.put("10-flannel.conflist")
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !hasQoscni(n.read(filepath.Join(CNIConfDir, "10-flannel.conflist"))) {
		t.Fatal("not chained")
	}
}

func TestUninstallEntryWithoutBackup(t *testing.T) {
	n := newNode(t)
	n.put("10-flannel.conflist")
	n.install(Options{Mode: Chained})
	primary := filepath.Join(CNIConfDir, "10-flannel.conflist")
	if err := os.Remove(n.path(primary + BackupSuffix)); err != nil {
		t.Fatal(err)
	}
	n.uninstall()
	if got := pluginTypes(t, n.read(primary)); !slices.Equal(got, []string{"flannel"}) {
		t.Fatalf("plugins after uninstall %v", got)
	}
}

func TestChainedRejectsBadPrimary(t *testing.T) {
	for name, content := range map[string]string{
		"old version":  `{"cniVersion": "0.2.0", "name": "x", "type": "bridge"}`,
		"standalone":   string(DefaultStandaloneConflist),
		"only portmap": `{"cniVersion": "0.3.1", "name": "x", "plugins": [{"type": "portmap"}]}`,
		"not json":     `{"cniVersion": `,
	} {
		n := newNode(t)
		p := filepath.Join(CNIConfDir, "10-x.conflist")
		_ = os.MkdirAll(n.path(CNIConfDir), 0o755)
		_ = os.WriteFile(n.path(p), []byte(content), 0o644)
		if _, err := Install(context.Background(), Options{Root: n.root, PluginBinary: n.bin, Mode: Chained}); err == nil {
			t.Errorf("%s: accepted", name)
		}
		if got := string(n.read(p)); got != content {
			t.Errorf("%s: primary changed on error", name)
		}
	}
}

func TestMain_InstallUninstall(t *testing.T) {
	n := newNode(t)
	var out, errb bytes.Buffer
	args := []string{"install", "--root", n.root, "--plugin-binary", n.bin, "--pod-cidrs", "10.244.1.0/24,fd00::/64"}
	if rc := Main(args, &out, &errb); rc != 0 {
		t.Fatalf("install rc %d: %s", rc, errb.String())
	}
	if !strings.Contains(out.String(), "written") {
		t.Fatalf("output: %s", out.String())
	}
	out.Reset()
	if rc := Main(args, &out, &errb); rc != 0 || !strings.Contains(out.String(), "nothing changed") {
		t.Fatalf("re-install rc %d: %s", rc, out.String())
	}
	out.Reset()
	if rc := Main([]string{"uninstall", "--root", n.root, "--skip-kernel"}, &out, &errb); rc != 0 {
		t.Fatalf("uninstall rc %d: %s", rc, errb.String())
	}
	if n.exists(confPath) || n.exists(binPath) {
		t.Fatal("uninstall left files")
	}
	if rc := Main([]string{"install", "--mode", "bogus", "--root", n.root, "--plugin-binary", n.bin}, &out, &errb); rc != 1 {
		t.Fatalf("bad mode rc %d", rc)
	}
	if rc := Main([]string{"frobnicate"}, &out, &errb); rc != 2 {
		t.Fatalf("bad command rc %d", rc)
	}
}

// Where br_netfilter cannot be loaded (here: no modules for this kernel
// where the node's /lib/modules should be) the install still puts qoscni
// in place and warns, with the load's reason and the words the plugin's
// STATUS uses; where the node's /proc/sys/net is not mounted it leaves
// br_netfilter alone and says so.
func TestStandaloneInstallWithoutBridgeNetfilter(t *testing.T) {
	n := newNode(t)
	procSys := t.TempDir()
	if err := os.MkdirAll(filepath.Join(procSys, "net", "core"), 0o755); err != nil {
		t.Fatal(err)
	}
	rep := n.install(Options{PodCIDRs: cidrs("10.244.1.0/24"), Kernel: true, ProcSys: procSys, ModulesDir: t.TempDir()})
	if !n.exists(confPath) || !n.exists(binPath) {
		t.Fatal("install did not put the plugin in place")
	}
	warnings := strings.Join(rep.Warnings, "\n")
	for _, w := range []string{"find module br_netfilter", "/lib/modules mounted", "net.bridge.bridge-nf-call-iptables", "modprobe br_netfilter"} {
		if !strings.Contains(warnings, w) {
			t.Errorf("warnings do not say %q:\n%s", w, warnings)
		}
	}
	t.Logf("warnings:\n%s", warnings)

	// Not mounted: nothing there, or the empty mountpoint.
	empty := t.TempDir()
	if err := os.Mkdir(filepath.Join(empty, "net"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, procSys := range []string{filepath.Join(t.TempDir(), "none"), empty} {
		rep = newNode(t).install(Options{PodCIDRs: cidrs("10.244.1.0/24"), Kernel: true, ProcSys: procSys, ModulesDir: t.TempDir()})
		if len(rep.Warnings) != 1 || !strings.Contains(rep.Warnings[0], "br_netfilter left alone") || !strings.Contains(rep.Warnings[0], ProcSysNetDir) {
			t.Errorf("without /proc/sys/net: warnings %q", rep.Warnings)
		}
	}
}
