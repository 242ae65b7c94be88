// Package sysctl reads and writes kernel settings under /proc/sys in a
// given network namespace. /proc/sys/net shows the namespace of the thread
// that opens a file under it, not the process's: a setting of another
// namespace is read or written from a thread switched into it, and only
// for that open.
//
// Paths are relative to /proc/sys with '/' separators
// ("net/ipv4/conf/eth0.100/forwarding"), so interface names containing
// '.' need no escaping.
//
// The same holds for the host's /proc/sys/net mounted elsewhere: which
// namespace a file under it shows is decided when it is opened, not by
// where it is mounted. A Tree names such a mount: the installer's
// container reaches the node's settings through one, since runtimes give
// a container its own /proc/sys read only.
package sysctl

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Current is the nsFd that means the calling thread's own namespace.
const Current = -1

// Tree is the directory a /proc/sys is seen at.
type Tree string

// Proc is the process's own /proc/sys.
const Proc Tree = "/proc/sys"

func (t Tree) file(path string) string {
	if t == "" {
		t = Proc
	}
	return string(t) + "/" + path
}

// Get is Tree.Get of Proc.
func Get(nsFd int, path string) (string, error) { return Proc.Get(nsFd, path) }

// Set is Tree.Set of Proc.
func Set(nsFd int, path, value string) error { return Proc.Set(nsFd, path, value) }

// Get returns the setting at path, without surrounding white space, as
// the network namespace nsFd (Current: the calling thread's) has it.
func (t Tree) Get(nsFd int, path string) (string, error) {
	var v string
	err := inNetns(nsFd, func() error {
		b, err := os.ReadFile(t.file(path))
		v = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", path, err)
	}
	return v, nil
}

// Set makes the setting at path hold value in the namespace nsFd, and
// writes only when it holds something else: no write, no side effect
// (route_localnet flushes the routing cache when it goes to 0), and a
// setting already right needs no writable /proc/sys.
func (t Tree) Set(nsFd int, path, value string) error {
	return inNetns(nsFd, func() error {
		full := t.file(path)
		cur, err := os.ReadFile(full)
		if err != nil {
			return fmt.Errorf("read sysctl %s: %w", path, err)
		}
		if strings.TrimSpace(string(cur)) == value {
			return nil
		}
		if err := os.WriteFile(full, []byte(value), 0o644); err != nil {
			return fmt.Errorf("set sysctl %s=%s: %w", path, value, err)
		}
		return nil
	})
}

// SetIfPresent is Set for settings that exist only when a module is
// loaded (br_netfilter) or IPv6 is enabled: a missing one is no error.
func SetIfPresent(nsFd int, path, value string) error {
	err := Set(nsFd, path, value)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// inNetns runs fn on the calling goroutine's OS thread switched into the
// network namespace nsFd (Current: fn runs as it is), and switches back.
// The thread stays locked to the goroutine while it is elsewhere, so no
// other goroutine runs in the wrong namespace; if it cannot come back,
// it stays locked, and the runtime discards it when the goroutine ends.
func inNetns(nsFd int, fn func() error) error {
	if nsFd < 0 {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open current netns: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(nsFd, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns: %w", err)
	}
	ferr := fn()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		return errors.Join(ferr, fmt.Errorf("return from netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}
