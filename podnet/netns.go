// Package podnet wires a pod into the node: a veth pair whose host end sits
// on a Linux bridge, the pod's addresses, routes and MTU, the gateway
// addresses on the bridge, and the masquerade elements for ipMasq.
package podnet

import (
	"errors"
	"fmt"
	"os"
	"runtime"

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
	return &NetNS{Path: path, Handle: h}, nil
}

func (n *NetNS) Close() error { return n.Handle.Close() }

// Do runs fn with the calling OS thread switched into the namespace. Only
// work that depends on the thread's namespace (writes under /proc/sys/net)
// needs it; netlink work uses per-namespace sockets instead.
func (n *NetNS) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(n.Handle); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", n.Path, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread is stuck in the wrong namespace: keep it locked so the
		// runtime discards it when this goroutine ends.
		return errors.Join(ferr, fmt.Errorf("return from netns %s: %w", n.Path, err))
	}
	runtime.UnlockOSThread()
	return ferr
}
