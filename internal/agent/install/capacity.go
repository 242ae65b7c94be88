package install

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/shaping"
)

// CapacityAuto asks install to take the node capacity from the link speed
// the kernel reports for the device of the node's default route:
// AutoCapacityPercent of it.
const CapacityAuto = "auto"

// AutoCapacityPercent is the share of the link speed "auto" takes.
const AutoCapacityPercent = 95

// NodeCapacity is the "nodeCapacity" object install writes into qoscni's
// entry: Kubernetes quantities in bit/s.
type NodeCapacity struct{ Ingress, Egress string }

// ParseNodeCapacity reads the --node-capacity flag: "" (leave the config's
// own), "auto", one quantity for both directions ("10G"), or
// "ingress=10G,egress=5G" (either may be left out: that direction has no
// hierarchy). Quantities are checked as the plugin checks them.
func ParseNodeCapacity(s string) (c NodeCapacity, auto bool, err error) {
	s = strings.TrimSpace(s)
	switch {
	case s == "":
		return NodeCapacity{}, false, nil
	case s == CapacityAuto:
		return NodeCapacity{}, true, nil
	case !strings.Contains(s, "="):
		if _, err := shaping.ParseBits("--node-capacity", s); err != nil {
			return c, false, err
		}
		return NodeCapacity{Ingress: s, Egress: s}, false, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(kv), "=")
		if _, err := shaping.ParseBits("--node-capacity "+k, v); err != nil {
			return c, false, err
		}
		switch k {
		case "ingress":
			c.Ingress = v
		case "egress":
			c.Egress = v
		default:
			return c, false, fmt.Errorf("--node-capacity: %q is neither ingress nor egress", k)
		}
	}
	return c, false, nil
}

// ethtool's legacy get-settings request (struct ethtool_cmd, 44 bytes):
// what the kernel reports as the link's speed, in Mb/s, for any driver
// that knows one (veth reports 10000).
const (
	ethtoolGSet      = 0x00000001
	ethtoolSpeedUnkn = 0xFFFFFFFF
)

type ethtoolCmd struct {
	Cmd         uint32
	Supported   uint32
	Advertising uint32
	Speed       uint16
	Duplex      uint8
	Port        uint8
	PhyAddress  uint8
	Transceiver uint8
	Autoneg     uint8
	MdioSupport uint8
	Maxtxpkt    uint32
	Maxrxpkt    uint32
	SpeedHi     uint16
	EthTpMdix   uint8
	Reserved2   uint8
	LpAdvert    uint32
	Reserved    [2]uint32
}

type ifreqData struct {
	Name [unix.IFNAMSIZ]byte
	Data uintptr
	_    [16]byte
}

// uplinkSpeed finds the device of the default route in the namespace at
// netnsPath ("" = this process's) and the speed the kernel reports for it
// in bit/s; 0 when the driver reports none.
func uplinkSpeed(netnsPath string) (string, uint64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if netnsPath != "" {
		orig, err := netns.Get()
		if err != nil {
			return "", 0, err
		}
		defer orig.Close()
		target, err := netns.GetFromPath(netnsPath)
		if err != nil {
			return "", 0, fmt.Errorf("open %s: %w", netnsPath, err)
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			return "", 0, err
		}
		defer func() { _ = netns.Set(orig) }()
	}
	dev := ""
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Dst: nil}, netlink.RT_FILTER_DST)
		if err != nil {
			return "", 0, fmt.Errorf("list default routes: %w", err)
		}
		for _, r := range routes {
			if r.LinkIndex > 0 {
				l, err := netlink.LinkByIndex(r.LinkIndex)
				if err == nil {
					dev = l.Attrs().Name
					break
				}
			}
		}
		if dev != "" {
			break
		}
	}
	if dev == "" {
		return "", 0, errors.New("the node has no default route: no uplink to take the capacity from")
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return dev, 0, err
	}
	defer unix.Close(fd)
	cmd := ethtoolCmd{Cmd: ethtoolGSet}
	var req ifreqData
	copy(req.Name[:], dev)
	req.Data = uintptr(unsafe.Pointer(&cmd))
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&req))); errno != 0 {
		if errno == unix.EOPNOTSUPP {
			return dev, 0, nil
		}
		return dev, 0, fmt.Errorf("ethtool get settings of %s: %w", dev, errno)
	}
	runtime.KeepAlive(&cmd)
	mbps := uint32(cmd.Speed) | uint32(cmd.SpeedHi)<<16
	if mbps == 0 || mbps == ethtoolSpeedUnkn || mbps == 0xFFFF {
		return dev, 0, nil
	}
	return dev, uint64(mbps) * 1_000_000, nil
}

// resolveCapacity is what install writes for the flag's value.
func resolveCapacity(flag string, netnsPath string) (*NodeCapacity, string, error) {
	c, auto, err := ParseNodeCapacity(flag)
	if err != nil || (!auto && c == (NodeCapacity{})) {
		return nil, "", err
	}
	if !auto {
		return &c, "", nil
	}
	dev, bits, err := uplinkSpeed(netnsPath)
	if err != nil {
		return nil, "", err
	}
	if bits == 0 {
		return nil, "", fmt.Errorf("--node-capacity auto: the kernel reports no speed for %s, the device of the default route; give the capacity (e.g. --node-capacity 10G)", dev)
	}
	// The hierarchy must be the bottleneck, not the link behind it:
	// shaped at the link's own speed, HTB (which counts frames without
	// the wire's preamble and gap) lets the queue build in the NIC or
	// upstream, where requests mean nothing (make bench-guarantees: at
	// the uplink's rate a 60 % request got 0.09 of itself at 1 Gbit/s; at
	// 95 % every request was met).
	q := fmt.Sprintf("%d", bits/100*AutoCapacityPercent)
	return &NodeCapacity{Ingress: q, Egress: q}, dev, nil
}

// setCapacity puts the capacity into qoscni's entry (nil: leave it).
func setCapacity(entry object, c *NodeCapacity) {
	if c == nil {
		return
	}
	nc := object{}
	if c.Ingress != "" {
		nc["ingress"] = c.Ingress
	}
	if c.Egress != "" {
		nc["egress"] = c.Egress
	}
	entry["nodeCapacity"] = nc
}
