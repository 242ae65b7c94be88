package metrics

import (
	"encoding/binary"
	"fmt"
	"os"

	"github.com/florianl/go-tc"
	nl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/tcdump"
)

// QdiscStats are the statistics of one device's root qdisc.
type QdiscStats struct {
	Kind       string
	Handle     uint32
	Bytes      uint64
	Packets    uint64
	Drops      uint32
	Overlimits uint32
	Requeues   uint32
	Backlog    uint32 // bytes
	Qlen       uint32 // packets
}

// Netns is the network namespace the node's devices live in.
type Netns struct {
	f *os.File // nil: the agent's own namespace
}

// OpenNetns opens path ("" = the caller's own namespace).
func OpenNetns(path string) (*Netns, error) {
	if path == "" {
		return &Netns{}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	return &Netns{f: f}, nil
}

// Close releases the namespace handle.
func (n *Netns) Close() error {
	if n == nil || n.f == nil {
		return nil
	}
	return n.f.Close()
}

// shapingFd is the namespace as shaping.Open takes it (-1: the current one).
func (n *Netns) shapingFd() int {
	if n == nil || n.f == nil {
		return -1
	}
	return int(n.f.Fd())
}

func (n *Netns) fd() int {
	if n == nil || n.f == nil {
		return 0 // netlink.Config: 0 means the current namespace
	}
	return int(n.f.Fd())
}

// ReadRootQdiscs returns the root qdisc statistics of every device of the
// namespace, by device name, from exactly one link dump and one qdisc dump
// whatever the number of pods. The qdisc dump is tcdump's, which reads
// TCA_STATS2 (64-bit packets, requeues) and skips what it does not know.
func ReadRootQdiscs(ns *Netns) (map[string]QdiscStats, error) {
	names, err := linkNames(ns)
	if err != nil {
		return nil, err
	}
	qdiscs, err := tcdump.QdiscsAt(ns.shapingFd())
	if err != nil {
		return nil, err
	}
	out := make(map[string]QdiscStats, len(names))
	for _, q := range qdiscs {
		name, ok := names[q.Ifindex]
		if !ok || q.Parent != tc.HandleRoot {
			continue
		}
		s := QdiscStats{Kind: q.Kind, Handle: q.Handle}
		if c := q.Counters; c != nil {
			s.Bytes, s.Packets, s.Drops, s.Overlimits = c.Bytes, c.Packets, c.Drops, c.Overlimits
			s.Requeues, s.Backlog, s.Qlen = c.Requeues, c.Backlog, c.Qlen
		}
		out[name] = s
	}
	return out, nil
}

// linkNames dumps the links and decodes only their names: the full link
// parse of a netlink library costs more than the whole qdisc dump on a node
// with a thousand veth and IFB devices.
func linkNames(ns *Netns) (map[uint32]string, error) {
	c, err := nl.Dial(unix.NETLINK_ROUTE, &nl.Config{NetNS: ns.fd()})
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink for links: %w", err)
	}
	defer c.Close()
	msgs, err := c.Execute(nl.Message{
		Header: nl.Header{Type: unix.RTM_GETLINK, Flags: nl.Request | nl.Dump},
		Data:   make([]byte, unix.SizeofIfInfomsg),
	})
	if err != nil {
		return nil, fmt.Errorf("dump links: %w", err)
	}
	names := make(map[uint32]string, len(msgs))
	for _, m := range msgs {
		if len(m.Data) < unix.SizeofIfInfomsg {
			continue
		}
		index := binary.NativeEndian.Uint32(m.Data[4:8])
		ad, err := nl.NewAttributeDecoder(m.Data[unix.SizeofIfInfomsg:])
		if err != nil {
			continue
		}
		for ad.Next() {
			if ad.Type() == unix.IFLA_IFNAME {
				names[index] = ad.String()
				break
			}
		}
	}
	return names, nil
}
