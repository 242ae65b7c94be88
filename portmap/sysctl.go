package portmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"strings"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// route_localnet: the kernel routes a packet with a 127/8 source out of
// (and its reply back in through) an interface only when it is 1 there,
// which 127.0.0.1:hostPort needs. It also lets a pod behind that interface
// reach the node's loopback services (CVE-2020-8558) unless something
// drops 127/8 arriving from it: the martian chain and the localnet guard
// (guard.go) do, each on its own.

func routeLocalnetPath(iface string) (string, error) {
	if err := checkIfName(iface); err != nil {
		return "", err
	}
	return "/proc/sys/net/ipv4/conf/" + iface + "/route_localnet", nil
}

func checkIfName(iface string) error {
	if strings.ContainsAny(iface, "/\x00") || iface == "" || iface == "." || iface == ".." {
		return fmt.Errorf("route_localnet: bad interface name %q", iface)
	}
	return nil
}

// inNetns runs fn on a thread in the namespace nsFd (-1 = current):
// /proc/sys/net shows the namespace of the thread that opens it.
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
		// Leave the thread locked: the runtime discards it with the goroutine.
		return errors.Join(ferr, fmt.Errorf("return to netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// readRouteLocalnet reports whether route_localnet is 1 on iface.
func readRouteLocalnet(nsFd int, iface string) (bool, error) {
	path, err := routeLocalnetPath(iface)
	if err != nil {
		return false, err
	}
	var on bool
	err = inNetns(nsFd, func() error {
		cur, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("read %s: %w", path, err)
		}
		on = strings.TrimSpace(string(cur)) == "1"
		return nil
	})
	return on, err
}

// writeRouteLocalnet sets route_localnet on iface through /proc/sys (which
// also flushes the routing cache when it goes to 0). A container without
// a writable /proc/sys (the uninstall DaemonSet: runtimes mount it read
// only) sets it through rtnetlink instead, which NET_ADMIN allows.
func writeRouteLocalnet(nsFd int, iface string, ifindex int, on bool) error {
	path, err := routeLocalnetPath(iface)
	if err != nil {
		return err
	}
	v := "0"
	if on {
		v = "1"
	}
	err = inNetns(nsFd, func() error { return os.WriteFile(path, []byte(v), 0o644) })
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EROFS) || errors.Is(err, fs.ErrPermission) {
		if nerr := setRouteLocalnetNetlink(nsFd, ifindex, on); nerr != nil {
			return fmt.Errorf("set %s=%s: %w (through rtnetlink: %w)", path, v, err, nerr)
		}
		return nil
	}
	return fmt.Errorf("set %s=%s: %w", path, v, err)
}

// ipv4DevconfRouteLocalnet is IPV4_DEVCONF_ROUTE_LOCALNET of
// include/uapi/linux/ip.h: the attribute type of route_localnet inside
// IFLA_INET_CONF.
const ipv4DevconfRouteLocalnet = 26

// setRouteLocalnetNetlink sets the device's IPv4 devconf value with
// RTM_SETLINK, IFLA_AF_SPEC / AF_INET / IFLA_INET_CONF.
func setRouteLocalnetNetlink(nsFd, ifindex int, on bool) error {
	cfg := &netlink.Config{}
	if nsFd >= 0 {
		cfg.NetNS = nsFd
	}
	c, err := netlink.Dial(unix.NETLINK_ROUTE, cfg)
	if err != nil {
		return fmt.Errorf("open rtnetlink: %w", err)
	}
	defer c.Close()
	v := uint32(0)
	if on {
		v = 1
	}
	ae := netlink.NewAttributeEncoder()
	ae.Nested(unix.IFLA_AF_SPEC, func(af *netlink.AttributeEncoder) error {
		af.Nested(unix.AF_INET, func(inet *netlink.AttributeEncoder) error {
			inet.Nested(unix.IFLA_INET_CONF, func(conf *netlink.AttributeEncoder) error {
				conf.Uint32(ipv4DevconfRouteLocalnet, v)
				return nil
			})
			return nil
		})
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return err
	}
	ifi := make([]byte, unix.SizeofIfInfomsg)
	ifi[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(ifi[4:8], uint32(ifindex))
	_, err = c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_SETLINK, Flags: netlink.Request | netlink.Acknowledge},
		Data:   append(ifi, attrs...),
	})
	if err != nil {
		return fmt.Errorf("set route_localnet of ifindex %d: %w", ifindex, err)
	}
	return nil
}
