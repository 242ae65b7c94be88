package tcdump

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/florianl/go-tc"
	nl "github.com/mdlayher/netlink"
)

// message builds an RTM_NEWQDISC body: the tcmsg and the attributes.
func message(t testing.TB, ifindex, handle, parent uint32, kind string, opts func(*nl.AttributeEncoder)) []byte {
	t.Helper()
	hdr := make([]byte, tcmsgLen)
	binary.NativeEndian.PutUint32(hdr[4:], ifindex)
	binary.NativeEndian.PutUint32(hdr[8:], handle)
	binary.NativeEndian.PutUint32(hdr[12:], parent)
	ae := nl.NewAttributeEncoder()
	ae.String(tcaKind, kind)
	if opts != nil {
		ae.Nested(tcaOptions, func(n *nl.AttributeEncoder) error { opts(n); return nil })
	}
	ae.Uint32(99, 7) // an attribute no kernel sends yet
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return append(hdr, b...)
}

func structBytes(t testing.TB, v any) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, v); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestDecodeKinds(t *testing.T) {
	parms := tc.TbfQopt{Rate: tc.RateSpec{Rate: ^uint32(0)}, Limit: 3000, Buffer: 12, Mtu: 0}
	tbf := message(t, 4, 0x20000, 0x10020, "tbf", func(n *nl.AttributeEncoder) {
		n.Bytes(tcaTbfParms, structBytes(t, parms))
		n.Uint64(tcaTbfRate64, 1<<40)
		n.Uint32(tcaTbfBurst, 3028)
		n.Uint32(42, 1) // unknown to us and to go-tc
	})
	q, err := Decode(tbf)
	if err != nil {
		t.Fatal(err)
	}
	if q.Kind != "tbf" || q.Ifindex != 4 || q.Handle != 0x20000 || q.Parent != 0x10020 {
		t.Fatalf("header: %+v", q.Msg)
	}
	if q.Tbf == nil || q.Tbf.Parms == nil || *q.Tbf.Parms != parms || q.Tbf.Burst == nil || *q.Tbf.Burst != 3028 {
		t.Fatalf("tbf options: %+v", q.Tbf)
	}
	if q.Rate64 != 1<<40 {
		t.Fatalf("rate64 %d, want %d", q.Rate64, uint64(1<<40))
	}

	fq, err := Decode(message(t, 5, 0x10000, 0xFFFFFFFF, "fq_codel", func(n *nl.AttributeEncoder) {
		n.Uint32(tcaFqCodelTarget, 5000)
		n.Uint32(tcaFqCodelMemoryLimit, 1<<20)
		n.Uint32(12, 9) // a newer kernel's option
	}))
	if err != nil {
		t.Fatal(err)
	}
	if fq.FqCodel == nil || fq.FqCodel.Target == nil || *fq.FqCodel.Target != 5000 ||
		fq.FqCodel.MemoryLimit == nil || *fq.FqCodel.MemoryLimit != 1<<20 || fq.FqCodel.Limit != nil {
		t.Fatalf("fq_codel options: %+v", fq.FqCodel)
	}

	fifo, err := Decode(message(t, 5, 0x300000, 0x10030, "bfifo", func(n *nl.AttributeEncoder) {}))
	if err != nil {
		t.Fatal(err)
	}
	if fifo.Bfifo != nil {
		t.Fatalf("bfifo without its struct decoded as %+v", fifo.Bfifo)
	}
	// A FIFO's options are the bare struct, not attributes.
	hdr := message(t, 5, 0x300000, 0x10030, "bfifo", nil)
	ae := nl.NewAttributeEncoder()
	ae.Bytes(tcaOptions, structBytes(t, tc.FifoOpt{Limit: 73728}))
	rest, _ := ae.Encode()
	if fifo, err = Decode(append(hdr, rest...)); err != nil || fifo.Bfifo == nil || fifo.Bfifo.Limit != 73728 {
		t.Fatalf("bfifo: %+v, %v", fifo.Bfifo, err)
	}

	htb, err := Decode(message(t, 6, 0x10000, 0xFFFFFFFF, "htb", func(n *nl.AttributeEncoder) {
		n.Bytes(tcaHtbInit, structBytes(t, tc.HtbGlob{Version: 3, Rate2Quantum: 10, Defcls: 3}))
		n.Uint32(tcaHtbDirectQlen, 1000)
	}))
	if err != nil || htb.Htb == nil || htb.Htb.Init == nil || htb.Htb.Init.Defcls != 3 || htb.Htb.DirectQlen == nil || *htb.Htb.DirectQlen != 1000 {
		t.Fatalf("htb: %+v, %v", htb.Htb, err)
	}

	// A kind we do not read keeps its header and kind.
	cake, err := Decode(message(t, 7, 0x80000, 0xFFFFFFFF, "cake", func(n *nl.AttributeEncoder) { n.Uint64(2, 1<<50) }))
	if err != nil || cake.Kind != "cake" || cake.Handle != 0x80000 {
		t.Fatalf("cake: %+v, %v", cake, err)
	}
}

func TestDecodeRefusesBrokenFraming(t *testing.T) {
	if _, err := Decode(make([]byte, tcmsgLen-1)); err == nil {
		t.Fatal("short header accepted")
	}
	b := message(t, 1, 0, 0xFFFFFFFF, "noqueue", nil)
	b = append(b, 0xff, 0xff, 0x01, 0x00) // an attribute claiming 65535 bytes
	if _, err := Decode(b); err == nil {
		t.Fatal("broken attribute framing accepted")
	}
}

func TestDecodeShortStructsStayNil(t *testing.T) {
	q, err := Decode(message(t, 4, 0x20000, 0x10020, "tbf", func(n *nl.AttributeEncoder) {
		n.Bytes(tcaTbfParms, []byte{1, 2, 3})
		n.Bytes(tcaTbfBurst, []byte{1})
	}))
	if err != nil {
		t.Fatal(err)
	}
	if q.Tbf == nil || q.Tbf.Parms != nil || q.Tbf.Burst != nil {
		t.Fatalf("short options decoded: %+v", q.Tbf)
	}
}

// FuzzDecode: no input makes Decode or DecodeClass panic, and what they
// accept keeps the header it was given.
func FuzzDecode(f *testing.F) {
	f.Add(message(f, 4, 0x20000, 0x10020, "tbf", func(n *nl.AttributeEncoder) { n.Uint64(tcaTbfRate64, 1<<40) }))
	f.Add(message(f, 5, 0x10000, 0xFFFFFFFF, "fq_codel", func(n *nl.AttributeEncoder) { n.Uint32(tcaFqCodelTarget, 1) }))
	f.Add(message(f, 6, 0x10000, 0xFFFFFFFF, "htb", func(n *nl.AttributeEncoder) { n.Bytes(tcaHtbInit, make([]byte, 20)) }))
	f.Add(message(f, 6, 0x10000, 0xFFFFFFFF, "bfifo", nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		if c, err := DecodeClass(b); err == nil && c.Handle != binary.NativeEndian.Uint32(b[8:12]) {
			t.Fatalf("class header not kept: %+v", c.Msg)
		}
		q, err := Decode(b)
		if err != nil {
			return
		}
		if q.Ifindex != binary.NativeEndian.Uint32(b[4:8]) || q.Handle != binary.NativeEndian.Uint32(b[8:12]) {
			t.Fatalf("header not kept: %+v", q.Msg)
		}
	})
}

func TestDecodeClass(t *testing.T) {
	opt := tc.HtbOpt{Rate: tc.RateSpec{Rate: ^uint32(0)}, Ceil: tc.RateSpec{Rate: 1000}, Buffer: 5, Cbuffer: 6, Quantum: 65550, Prio: 3}
	hdr := make([]byte, tcmsgLen)
	binary.NativeEndian.PutUint32(hdr[4:], 9)
	binary.NativeEndian.PutUint32(hdr[8:], 0x10042)
	binary.NativeEndian.PutUint32(hdr[12:], 0x10001)
	ae := nl.NewAttributeEncoder()
	ae.String(tcaKind, "htb")
	ae.Nested(tcaOptions, func(n *nl.AttributeEncoder) error {
		n.Bytes(tcaHtbParms, structBytes(t, opt))
		n.Uint64(tcaHtbRate64, 6_000_000_000)
		n.Uint32(9, 1) // TCA_HTB_OFFLOAD, unknown here
		return nil
	})
	ae.Nested(tcaStats2, func(n *nl.AttributeEncoder) error {
		basic := make([]byte, 16)
		binary.NativeEndian.PutUint64(basic, 1<<40)
		binary.NativeEndian.PutUint32(basic[8:], 77)
		n.Bytes(tcaStatsBasic, basic)
		queue := make([]byte, 20)
		for i, v := range []uint32{2, 3000, 4, 5, 6} { // qlen, backlog, drops, requeues, overlimits
			binary.NativeEndian.PutUint32(queue[4*i:], v)
		}
		n.Bytes(tcaStatsQueue, queue)
		return nil
	})
	ae.Bytes(tcaXStats, structBytes(t, tc.HtbXStats{Lends: 8, Borrows: 9}))
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	c, err := DecodeClass(append(hdr, b...))
	if err != nil {
		t.Fatal(err)
	}
	if c.Handle != 0x10042 || c.Parent != 0x10001 || c.Htb == nil || c.Htb.Parms == nil || *c.Htb.Parms != opt ||
		c.Htb.Rate64 == nil || *c.Htb.Rate64 != 6_000_000_000 || c.Htb.Ceil64 != nil {
		t.Fatalf("htb class: %+v %+v", c.Msg, c.Htb)
	}
	if s := c.Stats; s == nil || s.Bytes != 1<<40 || s.Packets != 77 || s.Qlen != 2 || s.Backlog != 3000 || s.Drops != 4 || s.Overlimits != 6 {
		t.Fatalf("counters: %+v", c.Stats)
	}
	if c.XStats == nil || c.XStats.Htb == nil || c.XStats.Htb.Lends != 8 || c.XStats.Htb.Borrows != 9 {
		t.Fatalf("htb counters: %+v", c.XStats)
	}

	// A TBF's one class: kind and an empty TCA_STATS2, which go-tc
	// cannot read.
	ae = nl.NewAttributeEncoder()
	ae.String(tcaKind, "tbf")
	ae.Nested(tcaStats2, func(*nl.AttributeEncoder) error { return nil })
	b, _ = ae.Encode()
	if c, err = DecodeClass(append(hdr, b...)); err != nil || c.Kind != "tbf" || c.Stats != nil {
		t.Fatalf("tbf class: %+v, %v", c, err)
	}
}

func TestDecodeQdiscCounters(t *testing.T) {
	b := message(t, 4, 0x10000, 0xFFFFFFFF, "tbf", nil)
	ae := nl.NewAttributeEncoder()
	ae.Nested(tcaStats2, func(n *nl.AttributeEncoder) error {
		basic := make([]byte, 16)
		binary.NativeEndian.PutUint64(basic, 1<<40)
		binary.NativeEndian.PutUint32(basic[8:], 5) // wrapped
		n.Bytes(tcaStatsBasic, basic)
		n.Uint64(tcaStatsPkt64, 1<<32+5)
		queue := make([]byte, 20)
		for i, v := range []uint32{2, 3000, 4, 7, 6} { // qlen, backlog, drops, requeues, overlimits
			binary.NativeEndian.PutUint32(queue[4*i:], v)
		}
		n.Bytes(tcaStatsQueue, queue)
		return nil
	})
	rest, _ := ae.Encode()
	q, err := Decode(append(b, rest...))
	if err != nil {
		t.Fatal(err)
	}
	want := Counters{Bytes: 1 << 40, Packets: 1<<32 + 5, Drops: 4, Overlimits: 6, Requeues: 7, Backlog: 3000, Qlen: 2}
	if q.Counters == nil || *q.Counters != want {
		t.Fatalf("counters %+v, want %+v", q.Counters, want)
	}
}
