package portmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/sysctl"
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
	return "net/ipv4/conf/" + iface + "/route_localnet", nil
}

func checkIfName(iface string) error {
	if strings.ContainsAny(iface, "/\x00") || iface == "" || iface == "." || iface == ".." {
		return fmt.Errorf("route_localnet: bad interface name %q", iface)
	}
	return nil
}

// readRouteLocalnet reports whether route_localnet is 1 on iface in the
// namespace nsFd (-1: the calling thread's).
func readRouteLocalnet(nsFd int, iface string) (bool, error) {
	path, err := routeLocalnetPath(iface)
	if err != nil {
		return false, err
	}
	v, err := sysctl.Get(nsFd, path)
	return v == "1", err
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
	err = sysctl.Set(nsFd, path, v)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EROFS) || errors.Is(err, fs.ErrPermission) {
		if nerr := setRouteLocalnetNetlink(nsFd, ifindex, on); nerr != nil {
			return fmt.Errorf("%w (through rtnetlink: %w)", err, nerr)
		}
		return nil
	}
	return err
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
