package shaping

import (
	"bytes"
	"encoding/binary"
	"io"
	"log"
	"reflect"
	"testing"
	"unsafe"

	tc "github.com/florianl/go-tc"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"
)

// This file builds rtnetlink dump messages byte for byte as the kernel
// writes them (tc_fill_qdisc / tc_fill_tclass with the qdisc's own dump
// callback) and runs them through go-tc's own decoder, so the decode of
// qdiscs this kernel does not have (fq_codel) is tested on the objects
// go-tc would hand us from a production kernel.

// Attribute numbers from include/uapi/linux/rtnetlink.h and pkt_sched.h.
const (
	tcaKind      = 1
	tcaOptions   = 2
	tcaXstats    = 4
	tcaHwOffload = 12

	tcaHtbParms      = 1
	tcaHtbInit       = 2
	tcaHtbDirectQlen = 5
	tcaHtbRate64     = 6
	tcaHtbCeil64     = 7

	tcaTbfParms = 1

	tcaFqCodelTarget        = 1
	tcaFqCodelLimit         = 2
	tcaFqCodelInterval      = 3
	tcaFqCodelEcn           = 4
	tcaFqCodelFlows         = 5
	tcaFqCodelQuantum       = 6
	tcaFqCodelDropBatchSize = 8
	tcaFqCodelMemoryLimit   = 9
)

// kmsg is one object of a dump: struct tcmsg, then the attributes.
type kmsg struct {
	ifindex              int32
	handle, parent, info uint32
	attrs                []netlink.Attribute
}

func (m kmsg) bytes(t *testing.T) []byte {
	t.Helper()
	var b bytes.Buffer
	// struct tcmsg: family, two pad bytes, ifindex, handle, parent, info.
	hdr := struct {
		Family  uint8
		Pad1    uint8
		Pad2    uint16
		Ifindex int32
		Handle  uint32
		Parent  uint32
		Info    uint32
	}{unix.AF_UNSPEC, 0, 0, m.ifindex, m.handle, m.parent, m.info}
	if err := binary.Write(&b, binary.NativeEndian, hdr); err != nil {
		t.Fatal(err)
	}
	a, err := netlink.MarshalAttributes(m.attrs)
	if err != nil {
		t.Fatal(err)
	}
	b.Write(a)
	return b.Bytes()
}

func attrStruct(t *testing.T, typ uint16, v any) netlink.Attribute {
	t.Helper()
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, v); err != nil {
		t.Fatal(err)
	}
	return netlink.Attribute{Type: typ, Data: b.Bytes()}
}

func attrU32(typ uint16, v uint32) netlink.Attribute {
	return netlink.Attribute{Type: typ, Data: binary.NativeEndian.AppendUint32(nil, v)}
}

func attrU64(typ uint16, v uint64) netlink.Attribute {
	return netlink.Attribute{Type: typ, Data: binary.NativeEndian.AppendUint64(nil, v)}
}

// attrKind is TCA_KIND as nla_put_string writes it: NUL-terminated.
func attrKind(kind string) netlink.Attribute {
	return netlink.Attribute{Type: tcaKind, Data: append([]byte(kind), 0)}
}

// attrOptions is TCA_OPTIONS as the kernel opens it (nla_nest_start_noflag:
// no NLA_F_NESTED bit).
func attrOptions(t *testing.T, inner ...netlink.Attribute) netlink.Attribute {
	t.Helper()
	b, err := netlink.MarshalAttributes(inner)
	if err != nil {
		t.Fatal(err)
	}
	return netlink.Attribute{Type: tcaOptions, Data: b}
}

func attrHwOffload() netlink.Attribute { return netlink.Attribute{Type: tcaHwOffload, Data: []byte{0}} }

// kFqCodel is fq_codel_dump's TCA_OPTIONS (in its order) plus
// fq_codel_dump_stats' TCA_XSTATS (struct tc_fq_codel_xstats, qdisc type).
func kFqCodel(t *testing.T, ifindex int32, handle, parent, targetUs, limit, memLimit uint32) kmsg {
	xstats := make([]uint32, 10) // type 0 (qdisc) + 9 counters of the union's qdisc_stats
	return kmsg{ifindex: ifindex, handle: handle, parent: parent, attrs: []netlink.Attribute{
		attrKind("fq_codel"),
		attrOptions(t,
			attrU32(tcaFqCodelTarget, targetUs),
			attrU32(tcaFqCodelLimit, limit),
			attrU32(tcaFqCodelInterval, 100_000),
			attrU32(tcaFqCodelEcn, 1),
			attrU32(tcaFqCodelQuantum, 1514),
			attrU32(tcaFqCodelDropBatchSize, 64),
			attrU32(tcaFqCodelMemoryLimit, memLimit),
			attrU32(tcaFqCodelFlows, 1024),
		),
		attrHwOffload(),
		attrStruct(t, tcaXstats, xstats),
	}}
}

// kHTBRoot is htb_dump: TCA_HTB_INIT (struct tc_htb_glob) and the direct
// queue length.
func kHTBRoot(t *testing.T, ifindex int32) kmsg {
	return kmsg{ifindex: ifindex, handle: rootHandle, parent: tc.HandleRoot, info: 2, attrs: []netlink.Attribute{
		attrKind("htb"),
		attrOptions(t,
			attrStruct(t, tcaHtbInit, tc.HtbGlob{Version: 3, Rate2Quantum: 10, Defcls: 1}),
			attrU32(tcaHtbDirectQlen, 1000),
		),
		attrHwOffload(),
	}}
}

// kHTBClass is htb_dump_class for class 1:1 directly under the root: the
// 32-bit rate fields saturate, the 64-bit ones follow (no pad attribute on
// architectures with efficient unaligned access), tcm_info is the leaf.
func kHTBClass(t *testing.T, ifindex int32, rateBytes uint64, bufferTicks, leaf uint32) kmsg {
	rate32 := uint32(min(rateBytes, 0xFFFFFFFF))
	opts := []netlink.Attribute{attrStruct(t, tcaHtbParms, tc.HtbOpt{
		Rate:    tc.RateSpec{Linklayer: linkEthernet, Rate: rate32},
		Ceil:    tc.RateSpec{Linklayer: linkEthernet, Rate: rate32},
		Buffer:  bufferTicks,
		Cbuffer: bufferTicks,
		Quantum: htbQuantum,
	})}
	if rateBytes >= 1<<32 {
		opts = append(opts, attrU64(tcaHtbRate64, rateBytes), attrU64(tcaHtbCeil64, rateBytes))
	}
	return kmsg{ifindex: ifindex, handle: classHandle, parent: tc.HandleRoot, info: leaf, attrs: []netlink.Attribute{
		attrKind("htb"), attrOptions(t, opts...),
	}}
}

// kTBF is tbf_dump for a rate below 2^32 bytes/s (no TCA_TBF_RATE64).
func kTBF(t *testing.T, ifindex int32, handle uint32, q tc.TbfQopt) kmsg {
	return kmsg{ifindex: ifindex, handle: handle, parent: tc.HandleRoot, info: 2, attrs: []netlink.Attribute{
		attrKind("tbf"), attrOptions(t, attrStruct(t, tcaTbfParms, q)), attrHwOffload(),
	}}
}

// kSimple is a qdisc whose options do not matter to the decode (kernel
// defaults and foreign roots).
func kSimple(ifindex int32, kind string, handle, parent uint32) kmsg {
	return kmsg{ifindex: ifindex, handle: handle, parent: parent, info: 1, attrs: []netlink.Attribute{attrKind(kind), attrHwOffload()}}
}

// tcRequest is a change qoscni sent to the fake kernel.
type tcRequest struct {
	typ            netlink.HeaderType
	handle, parent uint32
	kind           string
	fq             tc.FqCodel // fq_codel options, when kind is fq_codel
}

// fakeTc is a go-tc handle whose socket answers every qdisc dump with
// qdiscs and every class dump with classes, as one multi-part reply, and
// acknowledges and records every change.
func fakeTc(t *testing.T, qdiscs, classes []kmsg) (*tc.Tc, *netlink.Conn, *[]tcRequest) {
	t.Helper()
	var changes []tcRequest
	conn := nltest.Dial(func(req []netlink.Message) ([]netlink.Message, error) {
		if len(req) == 0 {
			return nil, nil
		}
		var src []kmsg
		var typ netlink.HeaderType
		switch req[0].Header.Type {
		case unix.RTM_GETQDISC:
			src, typ = qdiscs, unix.RTM_NEWQDISC
		case unix.RTM_GETTCLASS:
			src, typ = classes, unix.RTM_NEWTCLASS
		case unix.RTM_NEWQDISC, unix.RTM_NEWTCLASS, unix.RTM_DELQDISC, unix.RTM_DELTCLASS, unix.RTM_NEWTFILTER, unix.RTM_DELTFILTER:
			changes = append(changes, decodeRequest(t, req[0]))
			return nltest.Error(0, req)
		default:
			t.Errorf("unexpected request type %d", req[0].Header.Type)
		}
		hdr := netlink.Header{Type: typ, Flags: netlink.Multi, Sequence: req[0].Header.Sequence, PID: req[0].Header.PID}
		out := make([]netlink.Message, 0, len(src)+1)
		for _, m := range src {
			out = append(out, netlink.Message{Header: hdr, Data: m.bytes(t)})
		}
		// The kernel ends every dump with NLMSG_DONE, also an empty one.
		done := hdr
		done.Type = netlink.Done
		return append(out, netlink.Message{Header: done, Data: make([]byte, 4)}), nil
	})
	// go-tc has no exported decoder and no way to pass a connection in: its
	// dump path behind the unexported socket field is the only way to run
	// its unmarshal code on given bytes. A rename there fails here loudly.
	c := &tc.Tc{}
	for name, v := range map[string]any{"con": conn, "logger": log.New(io.Discard, "", 0)} {
		f := reflect.ValueOf(c).Elem().FieldByName(name)
		if !f.IsValid() {
			t.Fatalf("go-tc's Tc has no field %s any more: update fakeTc", name)
		}
		reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem().Set(reflect.ValueOf(v))
	}
	t.Cleanup(func() { _ = conn.Close() })
	return c, conn, &changes
}

func decodeRequest(t *testing.T, m netlink.Message) tcRequest {
	t.Helper()
	r := tcRequest{typ: m.Header.Type}
	if len(m.Data) < 20 {
		t.Fatalf("short tc request: %d bytes", len(m.Data))
	}
	r.handle = binary.NativeEndian.Uint32(m.Data[8:])
	r.parent = binary.NativeEndian.Uint32(m.Data[12:])
	attrs, err := netlink.UnmarshalAttributes(m.Data[20:])
	if err != nil {
		t.Fatalf("tc request attributes: %v", err)
	}
	var opts []byte
	for _, a := range attrs {
		switch a.Type & 0x3FFF {
		case tcaKind:
			r.kind = string(bytes.TrimRight(a.Data, "\x00"))
		case tcaOptions:
			opts = a.Data
		}
	}
	if r.kind == "fq_codel" && opts != nil {
		inner, err := netlink.UnmarshalAttributes(opts)
		if err != nil {
			t.Fatalf("fq_codel options: %v", err)
		}
		for _, a := range inner {
			v := binary.NativeEndian.Uint32(a.Data)
			switch a.Type & 0x3FFF {
			case tcaFqCodelTarget:
				r.fq.Target = &v
			case tcaFqCodelLimit:
				r.fq.Limit = &v
			case tcaFqCodelMemoryLimit:
				r.fq.MemoryLimit = &v
			}
		}
	}
	return r
}
