package nfraw

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Sockets are one feature's nf_tables sockets in a namespace: Raw for
// elements and exact lookups, and a google/nftables connection for its
// fixed ruleset, opened only when that needs writing (closing a socket
// that committed rules costs the kernel 10 to 20 ms here, which no ADD
// should pay when the rules are in place).
type Sockets struct {
	NsFd int
	Raw  *Conn
	conn *nftables.Conn
}

// OpenSockets opens Raw in the namespace nsFd (-1: the current).
func OpenSockets(nsFd int) (*Sockets, error) {
	raw, err := Dial(nsFd)
	if err != nil {
		return nil, err
	}
	return &Sockets{NsFd: nsFd, Raw: raw}, nil
}

// NFT is the google/nftables connection, opened on first use.
func (s *Sockets) NFT() (*nftables.Conn, error) {
	if s.conn != nil {
		return s.conn, nil
	}
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(bigBuffers)}
	if s.NsFd >= 0 {
		opts = append(opts, nftables.WithNetNSFd(s.NsFd))
	}
	conn, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	s.conn = conn
	return conn, nil
}

// bufferBytes sizes the socket buffers of a google/nftables connection:
// one transaction is one sendmsg of every message, and the NetworkPolicy
// state of a node can be megabytes (the default, net.core.wmem_default,
// is 208 KiB: EMSGSIZE above it).
const bufferBytes = 64 << 20

// bigBuffers raises both buffers to bufferBytes, past the sysctl limits
// where the caller has CAP_NET_ADMIN (the plugin and the agent do), else
// as far as those limits allow. Memory is charged only for what is
// queued.
func bigBuffers(c *netlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], bufferBytes) != nil {
				serr = errors.Join(serr, unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], bufferBytes))
			}
		}
	})
	return errors.Join(err, serr)
}

// Close closes both.
func (s *Sockets) Close() error {
	var err error
	if s.conn != nil {
		err = s.conn.CloseLasting()
	}
	return errors.Join(err, s.Raw.Close())
}

// RemoveOwned removes, in one transaction, the elements of table's sets
// whose owner tag valid refuses (or that carry none), and returns how
// many.
func (r *Conn) RemoveOwned(table string, sets []string, valid func(Owner) bool) (int, error) {
	b := &Batch{}
	n := 0
	for _, s := range sets {
		els, err := r.DumpElems(table, s)
		if err != nil {
			return 0, err
		}
		var stale [][]byte
		for _, el := range els {
			if o, ok := DecodeOwner(el.Comment); !ok || !valid(o) {
				stale = append(stale, el.Key)
			}
		}
		if err := b.Destroy(table, s, stale...); err != nil {
			return 0, err
		}
		n += len(stale)
	}
	return n, r.Send(b)
}

// MatchFamily matches packets of IPv4 (or, v6, IPv6) in an inet chain.
func MatchFamily(v6 bool) []expr.Any {
	p := byte(unix.NFPROTO_IPV4)
	if v6 {
		p = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}
