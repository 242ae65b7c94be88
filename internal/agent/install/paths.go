// Package install puts qoscni on a node and takes it off again: the plugin
// binary in the CNI bin dir, the network configuration in the CNI config
// dir (a conflist of its own in standalone mode, an entry in the primary
// CNI's conflist in chained mode) and, on uninstall, qoscni's kernel
// objects. Every host path is relative to a root directory, so the
// DaemonSet's init container works on the host's files mounted under
// /host and tests work on a temporary directory.
//
// The constants below are the one source of truth for paths and ports: the
// manifests in deploy/ are tested against them, and so are the defaults of
// the plugin and the agent.
package install

import "strconv"

// Host paths (absolute, before the root is prepended).
const (
	// CNIBinDir is where the runtime looks for plugin executables.
	CNIBinDir = "/opt/cni/bin"
	// CNIConfDir is where the runtime looks for network configurations.
	CNIConfDir = "/etc/cni/net.d"
	// DataDir holds everything qoscni keeps on the node: StateDir,
	// JournalDir and IPAMDir. The DaemonSet mounts it as a whole.
	DataDir = "/var/lib/cni/qoscni"
	// StateDir is the plugin's attachment records (netconf.DefaultStateDir,
	// agent.DefaultStateDir).
	StateDir = DataDir + "/state"
	// JournalDir is the plugin call journal, the sibling of StateDir
	// (agent.DefaultJournalDir).
	JournalDir = DataDir + "/journal"
	// IPAMDir is the built-in allocator's reservations.
	IPAMDir = DataDir + "/ipam"
	// NetnsDir is where named network namespaces live; the agent mounts it
	// with HostToContainer propagation to see namespaces made after it.
	NetnsDir = "/run/netns"
)

// File names.
const (
	// PluginBinary is the plugin's executable name, the "type" of its entry.
	PluginBinary = "qoscni"
	// PluginType is the "type" of qoscni's entry in a network config.
	PluginType = PluginBinary
	// AgentBinary is the node agent's executable name.
	AgentBinary = "qoscni-agent"
	// ConflistName is the standalone network config file.
	ConflistName = "10-qoscni.conflist"
	// BackupSuffix is appended to a primary CNI config that chained mode
	// changed; the runtime ignores the file (it loads only .conf,
	// .conflist and .json).
	BackupSuffix = ".qoscni-backup"
)

// Container image and DaemonSet layout.
const (
	// ImageBinDir holds both binaries in the container image; install
	// finds the plugin next to its own executable.
	ImageBinDir = "/usr/local/bin"
	// ContainerHostRoot is where the install and uninstall containers see
	// the host's directories (--root).
	ContainerHostRoot = "/host"
	// ContainerConfigDir is where the ConfigMap with the network config is
	// mounted in the install container.
	ContainerConfigDir = "/etc/qoscni"
	// NodeNameEnv carries the node's name (downward API spec.nodeName).
	NodeNameEnv = "NODE_NAME"
)

// The agent's HTTP endpoints.
const (
	ListenPort  = 9742
	MetricsPath = "/metrics"
	HealthzPath = "/healthz"
	ReadyzPath  = "/readyz"
)

// ListenAddr is the agent's default listen address (agent.DefaultListen).
var ListenAddr = ":" + strconv.Itoa(ListenPort)

// Mode is how qoscni is put into the node's network configuration.
type Mode string

const (
	// Standalone: qoscni alone in its own conflist wires the pods.
	Standalone Mode = "standalone"
	// Chained: qoscni is appended to the primary CNI's conflist.
	Chained Mode = "chained"
)
