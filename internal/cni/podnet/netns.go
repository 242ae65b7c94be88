// Package podnet wires a pod into the node: a veth pair whose host end sits
// on a Linux bridge, the pod's addresses, routes and MTU, the gateway
// addresses on the bridge, and the masquerade elements for ipMasq.
package podnet

import (
	"errors"
	"fmt"
	"os"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetNS is an open handle on a network namespace file.
type NetNS struct {
	Path   string
	Handle netns.NsHandle
}

// ErrNetNSGone reports a namespace path that no longer names a namespace.
var ErrNetNSGone = errors.New("network namespace is gone")

// OpenNetNS opens a namespace by path and checks it really is one.
func OpenNetNS(path string) (*NetNS, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open netns %s: %w", path, ErrNetNSGone)
		}
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("open netns %s: %v", path, err), "")
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(h), &st); err != nil || (st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC) {
		h.Close()
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("open netns %s: not a network namespace", path), "")
	}
	// nsfs holds every kind of namespace: a mount or PID namespace would
	// pass the check above and fail only at the first setns, half way
	// through the wiring. ENOTTY: a kernel older than 4.11 cannot tell.
	if kind, err := unix.IoctlRetInt(int(h), unix.NS_GET_NSTYPE); !errors.Is(err, unix.ENOTTY) && (err != nil || kind != unix.CLONE_NEWNET) {
		h.Close()
		msg := fmt.Sprintf("open netns %s: not a network namespace (%s)", path, nsKind(kind, err))
		return nil, types.NewError(types.ErrInvalidNetNS, msg, "")
	}
	return &NetNS{Path: path, Handle: h}, nil
}

// nsKind names what NS_GET_NSTYPE said, for the error message.
func nsKind(kind int, err error) string {
	if err != nil {
		return fmt.Sprintf("NS_GET_NSTYPE: %v", err)
	}
	switch kind {
	case unix.CLONE_NEWNS:
		return "a mount namespace"
	case unix.CLONE_NEWPID:
		return "a PID namespace"
	case unix.CLONE_NEWUTS:
		return "a UTS namespace"
	case unix.CLONE_NEWIPC:
		return "an IPC namespace"
	case unix.CLONE_NEWUSER:
		return "a user namespace"
	case unix.CLONE_NEWCGROUP:
		return "a cgroup namespace"
	case unix.CLONE_NEWTIME:
		return "a time namespace"
	}
	return fmt.Sprintf("namespace type %#x", kind)
}

func (n *NetNS) Close() error { return n.Handle.Close() }
