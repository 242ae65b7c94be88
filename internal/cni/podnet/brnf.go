package podnet

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/sysctl"
)

// br_netfilter hands the frames a bridge forwards to the iptables and
// nftables ip/ip6 hooks, when its two sysctls are 1. kube-proxy needs that
// for a Service whose endpoint is on the client's own bridge: the request
// goes up to the node and is DNATed there, but the endpoint's reply is
// bridged straight back to the client, and without the hooks it never
// meets conntrack, keeps the endpoint's source address, and the client
// drops it (DNS through a CoreDNS pod of the same node fails this way).
const (
	BridgeNetfilterModule = "br_netfilter"
	BridgeNFCallIPTables  = "net/bridge/bridge-nf-call-iptables"
	BridgeNFCallIP6Tables = "net/bridge/bridge-nf-call-ip6tables"
)

// bridgeNFSysctls are checked in this order: the IPv4 one first, which is
// what every message about br_netfilter names when the module is missing.
var bridgeNFSysctls = [...]string{BridgeNFCallIPTables, BridgeNFCallIP6Tables}

// BridgeNetfilter reaches one node's br_netfilter settings. The kernel
// keeps them per network namespace (since Linux 5.3), and they exist only
// while the module is loaded or built in.
type BridgeNetfilter struct {
	// ProcSys is where the node's /proc/sys is seen.
	ProcSys sysctl.Tree
	// NetnsFd is the node's network namespace (sysctl.Current: the
	// calling thread's).
	NetnsFd int
}

// OwnBridgeNetfilter is the caller's namespace: the plugin runs in the
// node's.
func OwnBridgeNetfilter() BridgeNetfilter {
	return BridgeNetfilter{ProcSys: sysctl.Proc, NetnsFd: sysctl.Current}
}

// SysctlFound is one sysctl as Ensure found it: set to 1 by Ensure when
// Was is something else.
type SysctlFound struct {
	Name string // dotted
	Was  string
}

// Changed reports whether Ensure wrote it.
func (s SysctlFound) Changed() bool { return s.Was != "1" }

// Ensure sets both sysctls to 1 where they are not, and returns what it
// found of each. Where it cannot, the error is the CNI error
// (ErrLimitedConnectivity) naming the module, the sysctl and the fix.
func (b BridgeNetfilter) Ensure() (found []SysctlFound, err error) {
	for _, path := range bridgeNFSysctls {
		st := bridgeNFState{Path: path, Ensure: true}
		st.Value, st.ReadErr = b.ProcSys.Get(b.NetnsFd, path)
		if st.ReadErr == nil && st.Value != "1" {
			st.WriteErr = b.ProcSys.Set(b.NetnsFd, path, "1")
		}
		if err := st.problem(); err != nil {
			return found, err
		}
		found = append(found, SysctlFound{Name: SysctlName(path), Was: st.Value})
	}
	return found, nil
}

// Check is Ensure without writing, for who cannot write (the agent's
// container has /proc/sys read only): a sysctl at 0 is a problem here,
// which the plugin's next ADD or STATUS repairs.
func (b BridgeNetfilter) Check() error {
	for _, path := range bridgeNFSysctls {
		st := bridgeNFState{Path: path}
		st.Value, st.ReadErr = b.ProcSys.Get(b.NetnsFd, path)
		if err := st.problem(); err != nil {
			return err
		}
	}
	return nil
}

// SysctlName is the dotted name of a /proc/sys path, as sysctl(8) and
// sysctl.d spell it.
func SysctlName(path string) string { return strings.ReplaceAll(path, "/", ".") }

// bridgeNFState is what reading one of the sysctls gave and, when it was
// not 1 and Ensure ran, what setting it gave.
type bridgeNFState struct {
	Path     string
	Value    string
	ReadErr  error
	Ensure   bool // a write of 1 was due (WriteErr is its outcome)
	WriteErr error
}

// problem decides. The answer is ErrLimitedConnectivity rather than
// ErrPluginNotAvailable (which a full address range gives): in the CNI
// spec's words the plugin is not available "and existing containers in
// the network may have limited connectivity", and here they do, as their
// Services break too, not only the pods still to come.
func (s bridgeNFState) problem() error {
	name := SysctlName(s.Path)
	setIt := fmt.Sprintf("set it on the node: sysctl -w %s=1 %s=1, and the same in a file under /etc/sysctl.d/ for the next boots",
		SysctlName(BridgeNFCallIPTables), SysctlName(BridgeNFCallIP6Tables))
	var what, fix string
	switch {
	case errors.Is(s.ReadErr, fs.ErrNotExist):
		what = fmt.Sprintf("sysctl %s does not exist in the node's network namespace: the %s kernel module is not loaded",
			name, BridgeNetfilterModule)
		fix = fmt.Sprintf("load it on the node: modprobe %s, and for the next boots: echo %s > /etc/modules-load.d/%s.conf",
			BridgeNetfilterModule, BridgeNetfilterModule, BridgeNetfilterModule)
	case s.ReadErr != nil:
		what = fmt.Sprintf("sysctl %s (module %s) cannot be read in the node's network namespace (%v)", name, BridgeNetfilterModule, s.ReadErr)
		fix = setIt
	case s.Value == "1", s.Ensure && s.WriteErr == nil:
		return nil
	case s.Ensure:
		what = fmt.Sprintf("sysctl %s (module %s) is %s in the node's network namespace and cannot be set to 1 (%v)",
			name, BridgeNetfilterModule, s.Value, s.WriteErr)
		fix = setIt
	default:
		what = fmt.Sprintf("sysctl %s (module %s) is %s in the node's network namespace", name, BridgeNetfilterModule, s.Value)
		fix = "the qoscni plugin sets it back to 1 at its next ADD or STATUS; or " + setIt
	}
	return types.NewError(types.ErrLimitedConnectivity, fmt.Sprintf(
		"%s: %s, so traffic bridged between pods bypasses iptables and conntrack and a pod cannot reach a Service "+
			"whose endpoint is on the same node; %s (docs/install.md)", BridgeNetfilterModule, what, fix), "")
}
