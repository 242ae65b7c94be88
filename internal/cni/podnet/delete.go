package podnet

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// DeleteTogether removes the named interfaces of the caller's own network
// namespace in one request, so that the kernel unregisters them together
// and the caller waits for one RCU grace period and one reference drain,
// not one per device (make bench-floor: a veth pair and an IFB take 39 ms
// one after the other here, 23 ms together). Missing ones are fine.
//
// The kernel deletes by name one device at a time; together only by device
// group. So each device gets a group of its own for this call, drawn at
// random from [2^30, 2^31): group numbers people give devices are small
// (/etc/iproute2/group), and only a call of this function picks from that
// range, so the request deletes exactly these devices. A call killed
// between the two steps leaves them in that group, and the next DEL deletes
// them again by name.
func DeleteTogether(h *netlink.Handle, names ...string) error {
	var links []netlink.Link
	for _, name := range names {
		l, err := h.LinkByName(name)
		var nf netlink.LinkNotFoundError
		switch {
		case errors.As(err, &nf):
			continue
		case err != nil:
			return fmt.Errorf("look up %s: %w", name, err)
		}
		links = append(links, l)
	}
	if len(links) < 2 {
		for _, l := range links {
			if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				return fmt.Errorf("delete %s: %w", l.Attrs().Name, err)
			}
		}
		return nil
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	group := 1<<30 | binary.NativeEndian.Uint32(b[:])&(1<<30-1)
	for _, l := range links {
		if err := h.LinkSetGroup(l, int(group)); err != nil && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("put %s in device group %#x to delete it: %w", l.Attrs().Name, group, err)
		}
	}
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_GROUP, nl.Uint32Attr(group)))
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete device group %#x (%s): %w", group, linkNames(links), err)
	}
	return nil
}

func linkNames(links []netlink.Link) string {
	names := make([]string, len(links))
	for i, l := range links {
		names[i] = l.Attrs().Name
	}
	return strings.Join(names, ", ")
}
