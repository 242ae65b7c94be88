// Package install puts qoscni on a node and takes it off again: the plugin
// binary in the CNI bin dir, the network configuration in the CNI config
// dir (a conflist of its own in standalone mode, an entry in the primary
// CNI's conflist in chained mode) and, on uninstall, qoscni's kernel
// objects. Every host path is relative to a root directory, so the
// DaemonSet's init container works on the host's files mounted under
// /host and tests work on a temporary directory.
//
// The host paths come from internal/paths, which the plugin shares; the
// names, ports and layout below are install's own. The manifests in
// deploy/ are tested against both.
package install

import (
	"strconv"

	"github.com/qoscni/qoscni/internal/paths"
)

// Host paths (absolute, before the root is prepended): see internal/paths.
const (
	CNIBinDir  = paths.CNIBinDir
	CNIConfDir = paths.CNIConfDir
	// DataDir holds StateDir, JournalDir and IPAMDir; the DaemonSet mounts
	// it as a whole.
	DataDir    = paths.DataDir
	StateDir   = paths.StateDir
	JournalDir = paths.JournalDir
	IPAMDir    = paths.IPAMDir
	// NetnsDir: the agent mounts it with HostToContainer propagation to
	// see namespaces made after it.
	NetnsDir = paths.NetnsDir
	// ModulesDir holds the node's kernel modules: standalone install loads
	// br_netfilter from there (read only).
	ModulesDir = "/lib/modules"
	// ProcSysDir is where install reaches the node's sysctls. A
	// container's own /proc/sys is read only, so the DaemonSet mounts the
	// host's ProcSysNetDir under the root, writable: what it shows is the
	// namespace of the thread reading it, the node's with hostNetwork.
	ProcSysDir    = "/proc/sys"
	ProcSysNetDir = ProcSysDir + "/net"
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
	// NodeCapacityEnv is the default of install's --node-capacity.
	NodeCapacityEnv = "QOSCNI_NODE_CAPACITY"
	// CeilingsEnv gives install's --ceilings default.
	CeilingsEnv = "QOSCNI_CEILINGS"
	// NetworkPolicyEnv gives install's --network-policy default.
	NetworkPolicyEnv = "QOSCNI_NETWORK_POLICY"
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
