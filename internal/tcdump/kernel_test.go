package tcdump_test

import (
	"encoding/json"
	"os"
	"testing"

	"github.com/florianl/go-tc"

	"github.com/qoscni/qoscni/internal/tcdump"
	"github.com/qoscni/qoscni/internal/testnet"
)

// TestQdiscsReadsWhatGoTCCannot dumps a namespace where one device has a
// TBF above 2^32 bytes/s (dumped with TCA_TBF_RATE64) beside the other kinds
// qoscni reads, and finds every one with its options.
func TestQdiscsReadsWhatGoTCCannot(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.NewNS(t, "qtd")
	for _, d := range []string{"d0", "d1", "d2"} {
		ns.Exec(t, "ip", "link", "add", d, "type", "veth", "peer", "name", "p"+d)
		ns.Exec(t, "ip", "link", "set", d, "up")
	}
	ns.Exec(t, "tc", "qdisc", "add", "dev", "d0", "root", "handle", "5:", "tbf", "rate", "40gbit", "burst", "64kb", "limit", "1mb")
	ns.Exec(t, "tc", "qdisc", "add", "dev", "d1", "root", "handle", "1:", "htb", "default", "3")
	ns.Exec(t, "tc", "class", "add", "dev", "d1", "parent", "1:", "classid", "1:10", "htb", "rate", "10mbit")
	ns.Exec(t, "tc", "qdisc", "add", "dev", "d1", "parent", "1:10", "handle", "10:", "bfifo", "limit", "73728")
	// fq_codel is not built on these machines: the unit test decodes it.
	ns.Exec(t, "tc", "qdisc", "add", "dev", "d2", "root", "handle", "2:", "pfifo", "limit", "77")
	ns.Exec(t, "tc", "qdisc", "add", "dev", "d2", "clsact")

	f, err := os.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	qs, err := tcdump.QdiscsAt(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	c, err := tcdump.Dial(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	again, err := tcdump.Qdiscs(c)
	if err != nil || len(again) != len(qs) {
		t.Fatalf("second dump on a kept socket: %d qdiscs, %v (first: %d)", len(again), err, len(qs))
	}

	find := func(kind string, handle uint32) tcdump.Qdisc {
		t.Helper()
		for _, q := range qs {
			if q.Kind == kind && q.Handle == handle {
				return q
			}
		}
		t.Fatalf("no %s %x: in %+v", kind, handle>>16, qs)
		return tcdump.Qdisc{}
	}
	tbf := find("tbf", 0x50000)
	if tbf.Rate64 != 5_000_000_000 || tbf.Tbf == nil || tbf.Tbf.Parms == nil || tbf.Tbf.Parms.Rate.Rate != ^uint32(0) {
		t.Fatalf("tbf at 40gbit: rate64 %d, %+v", tbf.Rate64, tbf.Tbf)
	}
	if tbf.Parent != tc.HandleRoot {
		t.Fatalf("tbf parent %x", tbf.Parent)
	}
	htb := find("htb", 0x10000)
	if htb.Htb == nil || htb.Htb.Init == nil || htb.Htb.Init.Defcls != 3 {
		t.Fatalf("htb: %+v", htb.Htb)
	}
	fifo := find("bfifo", 0x100000)
	if fifo.Parent != 0x10010 || fifo.Bfifo == nil || fifo.Bfifo.Limit != 73728 {
		t.Fatalf("bfifo under 1:10: parent %x, %+v", fifo.Parent, fifo.Bfifo)
	}
	fq := find("pfifo", 0x20000)
	if fq.Pfifo == nil || fq.Pfifo.Limit != 77 {
		t.Fatalf("pfifo: %+v", fq.Pfifo)
	}
	clsact := find("clsact", 0xFFFF0000)
	if clsact.Parent != tc.HandleIngress || clsact.Ifindex != fq.Ifindex {
		t.Fatalf("clsact: %+v", clsact.Msg)
	}
	if fq.Ifindex == tbf.Ifindex || fq.Ifindex == htb.Ifindex {
		t.Fatal("devices' qdiscs not told apart by ifindex")
	}

	// What this package is for: go-tc v0.4.4 fails the whole dump on the
	// 64-bit rate. Logged, not asserted, so a fixed go-tc does not fail us.
	g, err := tc.Open(&tc.Config{NetNS: int(f.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, err := g.Qdisc().Get(); err != nil {
		t.Logf("go-tc's dump of the same namespace: %v", err)
	}
}

// TestHook reads one device's ingress hook qdisc: clsact, ingress, none
// ever, and none after its deletion, beside a device with a hook that is
// not asked about.
func TestHook(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.NewNS(t, "qth")
	for _, d := range []string{"h0", "h1", "h2", "h3"} {
		ns.Exec(t, "ip", "link", "add", d, "type", "veth", "peer", "name", "p"+d)
	}
	ns.Exec(t, "tc", "qdisc", "add", "dev", "h0", "clsact")
	ns.Exec(t, "tc", "qdisc", "add", "dev", "h1", "ingress")
	ns.Exec(t, "tc", "qdisc", "add", "dev", "h3", "clsact")
	ns.Exec(t, "tc", "qdisc", "del", "dev", "h3", "clsact")
	ns.Exec(t, "tc", "qdisc", "add", "dev", "ph2", "clsact")
	f, err := os.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for dev, want := range map[string]string{"h0": "clsact", "h1": "ingress", "h2": "", "h3": ""} {
		var link []struct {
			Index int `json:"ifindex"`
		}
		if err := json.Unmarshal([]byte(ns.Exec(t, "ip", "-j", "link", "show", dev)), &link); err != nil || len(link) != 1 {
			t.Fatalf("ip link show %s: %v", dev, err)
		}
		idx := link[0].Index
		q, err := tcdump.HookAt(int(f.Fd()), uint32(idx))
		got := ""
		if q != nil {
			got = q.Kind
			if q.Ifindex != uint32(idx) || q.Parent != tc.HandleIngress {
				t.Errorf("%s: %+v", dev, q.Msg)
			}
		}
		if err != nil || got != want {
			t.Errorf("%s: hook %q, %v; want %q", dev, got, err, want)
		}
	}
	if _, err := tcdump.HookAt(int(f.Fd()), 999999); err == nil {
		t.Error("no error for a missing device")
	}
}
