// Package paths is where qoscni keeps its files on a node unless a config
// or a flag says otherwise. The plugin, the agent, install/uninstall and
// the tests of the manifests all take their defaults from here, so a path
// is spelled once. It imports nothing of qoscni: the plugin links it.
package paths

import "path/filepath"

// Host paths (absolute; install and uninstall put their --root in front).
const (
	// CNIBinDir is where the runtime looks for plugin executables.
	CNIBinDir = "/opt/cni/bin"
	// CNIConfDir is where the runtime looks for network configurations.
	CNIConfDir = "/etc/cni/net.d"
	// DataDir holds everything qoscni keeps on the node; the DaemonSet
	// mounts it as a whole.
	DataDir = "/var/lib/cni/qoscni"
	// StateDir is the plugin's attachment records when the network config
	// has no stateDir.
	StateDir = DataDir + "/state"
	// JournalDir is the plugin call journal of StateDir (JournalDirOf).
	JournalDir = DataDir + "/journal"
	// IPAMDir is the built-in allocator's stores when ipam.dataDir is unset.
	IPAMDir = DataDir + "/ipam"
	// RegistryDir is the plugin's registry of the state directories it
	// wrote records to, beside StateDir so that the same mount covers it.
	RegistryDir = DataDir + "/statedirs"
	// GrantDir is where the agent's DRA driver hands the bandwidth the
	// scheduler placed to the plugin (internal/grant), beside the
	// registry (GrantDirOf).
	GrantDir = DataDir + "/dra"
	// NetnsDir is where named network namespaces live.
	NetnsDir = "/run/netns"
)

// JournalDirOf is the call journal of the networks whose records live in
// stateDir: its sibling "journal", so that a network with a state
// directory of its own (tests, a second qoscni network) has its own.
// HierarchyLock serializes changes to the node's bandwidth hierarchy
// (admission, class minors) between plugin calls and the agent. It sits
// beside the registry, so a test node with its own registry has its own.
func HierarchyLockOf(registryDir string) string { return beside(registryDir, "hierarchy.lock") }

func JournalDirOf(stateDir string) string { return beside(stateDir, "journal") }

// GrantDirOf is the DRA grant directory of the plugin calls and agent that
// share registryDir: its sibling "dra", so a test node with a registry of
// its own has its own grants.
func GrantDirOf(registryDir string) string { return beside(registryDir, "dra") }

// LocalnetDirOf is the localnet marker directory of the networks whose
// records live in stateDir: its sibling "localnet", which the DaemonSets
// mount with the parent.
func LocalnetDirOf(stateDir string) string { return beside(stateDir, "localnet") }

func beside(stateDir, name string) string {
	return filepath.Join(filepath.Dir(filepath.Clean(stateDir)), name)
}
