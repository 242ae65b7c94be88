// Package tcdump reads a network namespace's qdiscs, and a device's
// classes, over rtnetlink and decodes what qoscni reads of them: the
// message header, the kind, the options of tbf, bfifo, pfifo, fq_codel and
// htb, and an HTB class's counters. Every attribute it does not know is
// skipped.
//
// go-tc's Qdisc().Get() fails the whole dump when any qdisc of the node,
// ours or anyone's, carries one attribute its decoder does not know: a TBF
// above 2^32 bytes/s (34 Gbit/s), which the kernel dumps with
// TCA_TBF_RATE64, an fq_codel or cake with options newer than go-tc. One
// such qdisc anywhere on a node would stop every ADD, DEL and repair. Its
// Class().Get() fails on a class without counters (the one class a TBF
// under an HTB class shows): it reads TCA_STATS2, a nested attribute, as
// a flat struct, and an empty one as EOF. Writing still goes through
// go-tc; only these reads are qoscni's own.
package tcdump

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/florianl/go-tc"
	nl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// dumpTimeout bounds the wait for the kernel's answer: a caller holds the
// node's lock while it reads.
const dumpTimeout = 10 * time.Second

// tcmsgLen is struct tcmsg: family u8, pad [3]u8, ifindex i32, handle u32,
// parent u32, info u32.
const tcmsgLen = 20

// Attribute numbers of linux/rtnetlink.h and linux/pkt_sched.h.
const (
	tcaKind    = 1
	tcaOptions = 2
	tcaStats   = 3
	tcaXStats  = 4
	tcaStats2  = 7

	tcaStatsBasic = 1
	tcaStatsQueue = 3
	tcaStatsPkt64 = 8

	tcaTbfParms  = 1
	tcaTbfRate64 = 4
	tcaTbfPrate  = 5
	tcaTbfBurst  = 6
	tcaTbfPburst = 7

	tcaFqCodelTarget      = 1
	tcaFqCodelLimit       = 2
	tcaFqCodelInterval    = 3
	tcaFqCodelECN         = 4
	tcaFqCodelFlows       = 5
	tcaFqCodelQuantum     = 6
	tcaFqCodelCEThreshold = 7
	tcaFqCodelDropBatch   = 8
	tcaFqCodelMemoryLimit = 9

	tcaHtbParms      = 1
	tcaHtbInit       = 2
	tcaHtbDirectQlen = 5
	tcaHtbRate64     = 6
	tcaHtbCeil64     = 7
)

// Qdisc is one qdisc as the kernel dumped it. Rate64 and PeakRate64 are a
// TBF's rates when the kernel sent them as 64-bit attributes (at or above
// 2^32 bytes/s, where Tbf.Parms holds 2^32 - 1); 0 otherwise.
type Qdisc struct {
	tc.Object
	Rate64     uint64
	PeakRate64 uint64
	// Counters are its statistics from TCA_STATS2 (nil: none sent).
	Counters *Counters
}

// Counters are a qdisc's or class's statistics as TCA_STATS2 carries
// them: 64-bit bytes and packets (TCA_STATS_PKT64 once the packets no
// longer fit in 32 bits), and requeues, which the legacy TCA_STATS lacks.
type Counters struct {
	Bytes, Packets                             uint64
	Drops, Overlimits, Requeues, Backlog, Qlen uint32
}

// Dial opens a route netlink socket in the namespace nsFd (< 0: the
// caller's own).
func Dial(nsFd int) (*nl.Conn, error) {
	cfg := &nl.Config{}
	if nsFd >= 0 {
		cfg.NetNS = nsFd
	}
	c, err := nl.Dial(unix.NETLINK_ROUTE, cfg)
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink: %w", err)
	}
	return c, nil
}

// QdiscsAt dumps the qdiscs of the namespace nsFd (< 0: the caller's own)
// on a socket of its own.
func QdiscsAt(nsFd int) ([]Qdisc, error) {
	c, err := Dial(nsFd)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return Qdiscs(c)
}

// Qdiscs dumps every qdisc of c's namespace, one request whatever the
// number of devices. It leaves c without a read deadline.
func Qdiscs(c *nl.Conn) ([]Qdisc, error) {
	deadline(c)
	defer c.SetReadDeadline(time.Time{})
	out, err := dump(c, unix.RTM_GETQDISC, unix.RTM_NEWQDISC, 0, Decode)
	if err != nil {
		return nil, fmt.Errorf("dump qdiscs: %w", err)
	}
	return out, nil
}

// HookAt is the qdisc at device ifindex's ingress hook (clsact or
// ingress) in the namespace nsFd (< 0: the caller's own), nil when it has
// none: one request for that device, where a dump (Qdiscs) reads every
// device of the node, so it costs the same at 1 and at 1000 pods.
func HookAt(nsFd int, ifindex uint32) (*Qdisc, error) {
	c, err := Dial(nsFd)
	if err != nil {
		return nil, err
	}
	defer c.Close() // the acknowledgement after the answer stays unread
	deadline(c)
	req := make([]byte, tcmsgLen)
	binary.NativeEndian.PutUint32(req[4:], ifindex)
	binary.NativeEndian.PutUint32(req[12:], tc.HandleIngress) // the hook's parent; handle 0: whichever qdisc is there
	// The kernel answers a get as a notification, to the asking socket
	// only with NLM_F_ECHO; the acknowledgement ends a get it has nothing
	// to answer to.
	msgs, err := c.Execute(nl.Message{Header: nl.Header{Type: unix.RTM_GETQDISC, Flags: nl.Request | nl.Echo | nl.Acknowledge}, Data: req})
	// A device that never had a hook qdisc has no ingress queue (ENOENT);
	// one whose hook qdisc was deleted keeps the built-in noop there,
	// which the kernel does not report (EINVAL).
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the ingress hook qdisc of ifindex %d: %w", ifindex, err)
	}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWQDISC {
			continue
		}
		q, err := Decode(m.Data)
		if err != nil {
			return nil, err
		}
		if q.Ifindex != ifindex || (q.Kind != "clsact" && q.Kind != "ingress") {
			return nil, nil
		}
		return &q, nil
	}
	return nil, nil
}

// Classes dumps the classes of device ifindex, of every qdisc on it, in
// c's namespace. It leaves c without a read deadline.
func Classes(c *nl.Conn, ifindex uint32) ([]tc.Object, error) {
	deadline(c)
	defer c.SetReadDeadline(time.Time{})
	out, err := dump(c, unix.RTM_GETTCLASS, unix.RTM_NEWTCLASS, ifindex, DecodeClass)
	if err != nil {
		return nil, fmt.Errorf("dump classes of ifindex %d: %w", ifindex, err)
	}
	return out, nil
}

// deadline bounds the wait for the dump; a socket without deadlines (a
// test's fake kernel) waits as it always does.
func deadline(c *nl.Conn) { _ = c.SetReadDeadline(time.Now().Add(dumpTimeout)) }

func dump[T any](c *nl.Conn, get, reply uint16, ifindex uint32, decode func([]byte) (T, error)) ([]T, error) {
	req := make([]byte, tcmsgLen) // AF_UNSPEC; ifindex 0: every device
	binary.NativeEndian.PutUint32(req[4:], ifindex)
	msgs, err := c.Execute(nl.Message{
		Header: nl.Header{Type: nl.HeaderType(get), Flags: nl.Request | nl.Dump},
		Data:   req,
	})
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(msgs))
	for _, m := range msgs {
		if m.Header.Type != nl.HeaderType(reply) {
			continue
		}
		v, err := decode(m.Data)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Objects is qs as go-tc objects, for code that reads go-tc's types.
func Objects(qs []Qdisc) []tc.Object {
	out := make([]tc.Object, len(qs))
	for i := range qs {
		out[i] = qs[i].Object
	}
	return out
}

// Decode reads one RTM_NEWQDISC message body. Only a message too short for
// its header, or attributes whose framing is broken, are errors; options
// that do not decode leave that kind's field nil.
func Decode(b []byte) (Qdisc, error) {
	var q Qdisc
	opts, c, err := decodeMsg(b, &q.Object)
	q.Counters = c
	if err == nil && opts != nil {
		q.decodeOptions(opts)
	}
	return q, err
}

// DecodeClass reads one RTM_NEWTCLASS message body: the header, the kind,
// an HTB class's options and counters (from TCA_STATS2, 64-bit bytes, or
// else the legacy TCA_STATS) and HTB's extended counters.
func DecodeClass(b []byte) (tc.Object, error) {
	var o tc.Object
	opts, _, err := decodeMsg(b, &o)
	if err == nil && opts != nil && o.Kind == "htb" {
		o.Htb = decodeHtb(opts)
	}
	return o, err
}

// decodeMsg reads the header, kind and counters of a qdisc or class
// message into o (Stats: TCA_STATS2's, or else the legacy TCA_STATS) and
// returns its options, undecoded, and TCA_STATS2's counters.
func decodeMsg(b []byte, o *tc.Object) ([]byte, *Counters, error) {
	if len(b) < tcmsgLen {
		return nil, nil, fmt.Errorf("tc message of %d bytes, want at least %d", len(b), tcmsgLen)
	}
	o.Family = uint32(b[0])
	o.Ifindex = binary.NativeEndian.Uint32(b[4:8])
	o.Handle = binary.NativeEndian.Uint32(b[8:12])
	o.Parent = binary.NativeEndian.Uint32(b[12:16])
	o.Info = binary.NativeEndian.Uint32(b[16:20])
	ad, err := nl.NewAttributeDecoder(b[tcmsgLen:])
	if err != nil {
		return nil, nil, err
	}
	var opts, xstats []byte
	var legacy *tc.Stats
	var counters *Counters
	for ad.Next() {
		switch ad.Type() {
		case tcaKind:
			o.Kind = ad.String()
		case tcaOptions:
			opts = ad.Bytes()
		case tcaStats:
			var st tc.Stats
			if readStruct(ad.Bytes(), &st) {
				legacy = &st
			}
		case tcaStats2:
			counters = decodeStats2(ad.Bytes())
		case tcaXStats:
			xstats = ad.Bytes()
		}
	}
	if err := ad.Err(); err != nil {
		return nil, nil, fmt.Errorf("tc object of ifindex %d: %w", o.Ifindex, err)
	}
	o.Stats = legacy
	if c := counters; c != nil {
		o.Stats = &tc.Stats{Bytes: c.Bytes, Packets: uint32(c.Packets), Drops: c.Drops, Overlimits: c.Overlimits,
			Qlen: c.Qlen, Backlog: c.Backlog}
	}
	if o.Kind == "htb" && xstats != nil {
		var x tc.HtbXStats
		if readStruct(xstats, &x) {
			o.XStats = &tc.XStats{Htb: &x}
		}
	}
	return opts, counters, nil
}

// decodeStats2 reads the basic and queue counters of TCA_STATS2 (nil
// when it holds neither, as a TBF's class does).
func decodeStats2(b []byte) *Counters {
	ad, err := nl.NewAttributeDecoder(b)
	if err != nil {
		return nil
	}
	var c Counters
	found, pkt64 := false, false
	for ad.Next() {
		v := ad.Bytes()
		switch ad.Type() {
		case tcaStatsBasic: // u64 bytes, u32 packets
			if len(v) >= 12 {
				c.Bytes = binary.NativeEndian.Uint64(v[0:8])
				if !pkt64 {
					c.Packets = uint64(binary.NativeEndian.Uint32(v[8:12]))
				}
				found = true
			}
		case tcaStatsPkt64: // sent instead of a wrapped 32-bit count
			if len(v) >= 8 {
				c.Packets, pkt64 = binary.NativeEndian.Uint64(v[0:8]), true
			}
		case tcaStatsQueue: // u32 qlen, backlog, drops, requeues, overlimits
			if len(v) >= 20 {
				c.Qlen = binary.NativeEndian.Uint32(v[0:4])
				c.Backlog = binary.NativeEndian.Uint32(v[4:8])
				c.Drops = binary.NativeEndian.Uint32(v[8:12])
				c.Requeues = binary.NativeEndian.Uint32(v[12:16])
				c.Overlimits = binary.NativeEndian.Uint32(v[16:20])
				found = true
			}
		}
	}
	if ad.Err() != nil || !found {
		return nil
	}
	return &c
}

// decodeOptions fills the kind's options; a malformed one stays nil.
func (q *Qdisc) decodeOptions(b []byte) {
	switch q.Kind {
	case "tbf":
		q.decodeTbf(b)
	case "bfifo", "pfifo":
		var f tc.FifoOpt
		if readStruct(b, &f) {
			if q.Kind == "bfifo" {
				q.Bfifo = &f
			} else {
				q.Pfifo = &f
			}
		}
	case "fq_codel":
		q.FqCodel = decodeFqCodel(b)
	case "htb":
		q.Htb = decodeHtb(b)
	}
}

func (q *Qdisc) decodeTbf(b []byte) {
	ad, err := nl.NewAttributeDecoder(b)
	if err != nil {
		return
	}
	t := &tc.Tbf{}
	for ad.Next() {
		switch ad.Type() {
		case tcaTbfParms:
			var p tc.TbfQopt
			if readStruct(ad.Bytes(), &p) {
				t.Parms = &p
			}
		case tcaTbfRate64:
			q.Rate64 = u64(ad.Bytes())
		case tcaTbfPrate:
			q.PeakRate64 = u64(ad.Bytes())
		case tcaTbfBurst:
			t.Burst = u32p(ad.Bytes())
		case tcaTbfPburst:
			t.Pburst = u32p(ad.Bytes())
		}
	}
	if ad.Err() == nil {
		q.Tbf = t
	}
}

func decodeFqCodel(b []byte) *tc.FqCodel {
	ad, err := nl.NewAttributeDecoder(b)
	if err != nil {
		return nil
	}
	f := &tc.FqCodel{}
	fields := map[uint16]**uint32{
		tcaFqCodelTarget:      &f.Target,
		tcaFqCodelLimit:       &f.Limit,
		tcaFqCodelInterval:    &f.Interval,
		tcaFqCodelECN:         &f.ECN,
		tcaFqCodelFlows:       &f.Flows,
		tcaFqCodelQuantum:     &f.Quantum,
		tcaFqCodelCEThreshold: &f.CEThreshold,
		tcaFqCodelDropBatch:   &f.DropBatchSize,
		tcaFqCodelMemoryLimit: &f.MemoryLimit,
	}
	for ad.Next() {
		if p, ok := fields[ad.Type()]; ok {
			*p = u32p(ad.Bytes())
		}
	}
	if ad.Err() != nil {
		return nil
	}
	return f
}

// decodeHtb reads HTB's options: a qdisc's (TCA_HTB_INIT, the direct
// queue) or a class's (TCA_HTB_PARMS and the 64-bit rates); the attribute
// numbers are one space.
func decodeHtb(b []byte) *tc.Htb {
	ad, err := nl.NewAttributeDecoder(b)
	if err != nil {
		return nil
	}
	h := &tc.Htb{}
	for ad.Next() {
		switch ad.Type() {
		case tcaHtbParms:
			var p tc.HtbOpt
			if readStruct(ad.Bytes(), &p) {
				h.Parms = &p
			}
		case tcaHtbInit:
			var g tc.HtbGlob
			if readStruct(ad.Bytes(), &g) {
				h.Init = &g
			}
		case tcaHtbDirectQlen:
			h.DirectQlen = u32p(ad.Bytes())
		case tcaHtbRate64:
			if v := u64(ad.Bytes()); v != 0 {
				h.Rate64 = &v
			}
		case tcaHtbCeil64:
			if v := u64(ad.Bytes()); v != 0 {
				h.Ceil64 = &v
			}
		}
	}
	if ad.Err() != nil {
		return nil
	}
	return h
}

// readStruct decodes a fixed-size kernel struct; a shorter attribute is
// refused, a longer one (a newer kernel's extension) is read in its prefix.
func readStruct(b []byte, v any) bool {
	n := binary.Size(v)
	if n < 0 || len(b) < n {
		return false
	}
	return binary.Read(bytes.NewReader(b[:n]), binary.NativeEndian, v) == nil
}

func u32p(b []byte) *uint32 {
	if len(b) < 4 {
		return nil
	}
	v := binary.NativeEndian.Uint32(b)
	return &v
}

func u64(b []byte) uint64 {
	if len(b) < 8 {
		return 0
	}
	return binary.NativeEndian.Uint64(b)
}
