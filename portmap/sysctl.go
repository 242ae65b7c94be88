package portmap

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// setRouteLocalnet sets net.ipv4.conf.<iface>.route_localnet=1 in the
// namespace nsFd (-1 = current): the kernel routes a packet with a 127/8
// source out of (and its reply back in through) that interface only then,
// which 127.0.0.1:hostPort needs. The martian chain drops 127/8 arriving
// from anywhere else, so the sysctl opens no hole (CVE-2020-8558).
func setRouteLocalnet(nsFd int, iface string) error {
	if strings.ContainsAny(iface, "/\x00") || iface == "" || iface == "." || iface == ".." {
		return fmt.Errorf("set route_localnet: bad interface name %q", iface)
	}
	path := "/proc/sys/net/ipv4/conf/" + iface + "/route_localnet"
	write := func() error {
		cur, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("read %s: %w", path, err)
		}
		if strings.TrimSpace(string(cur)) == "1" {
			return nil
		}
		if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
			return fmt.Errorf("set %s=1: %w", path, err)
		}
		return nil
	}
	if nsFd < 0 {
		return write()
	}
	// /proc/sys/net shows the namespace of the thread that opens it.
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
	werr := write()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: the runtime discards it with the goroutine.
		return errors.Join(werr, fmt.Errorf("return to netns: %w", err))
	}
	runtime.UnlockOSThread()
	return werr
}
