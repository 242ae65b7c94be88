package shaping

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"time"

	"github.com/florianl/go-tc/core"
	mnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// What ADD and DEL read of the node hierarchy costs O(1) in the number of
// pods: one class at a time by handle, never a dump. go-tc only dumps (a
// dump of 500 classes on each IFB was most of an ADD's time at 500 pods),
// so these requests are made here: RTM_GETTCLASS without NLM_F_DUMP, which
// the kernel answers with that class alone, or ENOENT.
//
// The sum of requests is not summed either: the best-effort class's rate
// is kept at capacity - sum + floor (bestEffortShare), so it reads back
// exactly (reservedOf) whenever the sum is below the capacity. The plugin
// and the agent change it under the node's hierarchy lock, raising the sum
// before a class is made and lowering it after one is gone, so a crash in
// between leaves it too high (admission refuses more, never less) until
// the agent's repairer sets it from the kernel's classes again.

// hierClassInfo is one HTB class as RTM_GETTCLASS returns it.
type hierClassInfo struct {
	Parent    uint32
	RateBytes uint64
	CeilBytes uint64
	Prio      uint8
}

// TCA_HTB_* of linux/pkt_sched.h that x/sys/unix does not have.
const (
	tcaHTBParms  = 1
	tcaHTBRate64 = 6
	tcaHTBCeil64 = 7
)

// getClassTimeout bounds the wait for the kernel's answer to one read.
const getClassTimeout = 5 * time.Second

// tcmsgLen is struct tcmsg: family, 3 pad, ifindex, handle, parent, info.
const tcmsgLen = 20

// getHierClass reads class handle of the HTB on ifindex idx; ok is false
// when the kernel has no such class (or no HTB).
func (s *Shaper) getHierClass(idx int, handle uint32) (hierClassInfo, bool, error) {
	var info hierClassInfo
	req := make([]byte, tcmsgLen)
	req[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(req[4:], uint32(idx))
	binary.NativeEndian.PutUint32(req[8:], handle)
	// A reply that never came would hang an ADD under the node's lock.
	if err := s.rt.SetReadDeadline(time.Now().Add(getClassTimeout)); err != nil {
		return info, false, err
	}
	msgs, err := s.rt.Execute(mnl.Message{
		// NLM_F_ECHO: the kernel sends the class it found as a TC
		// notification, to the asker only when asked to echo.
		Header: mnl.Header{Type: unix.RTM_GETTCLASS, Flags: mnl.Request | mnl.Echo},
		Data:   req,
	})
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV) {
			return info, false, nil
		}
		return info, false, fmt.Errorf("read class %x:%x on ifindex %d: %w", handle>>16, handle&0xFFFF, idx, err)
	}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWTCLASS || len(m.Data) < tcmsgLen {
			continue
		}
		if binary.NativeEndian.Uint32(m.Data[8:]) != handle {
			continue
		}
		info.Parent = binary.NativeEndian.Uint32(m.Data[12:])
		if err := decodeHTBClass(m.Data[tcmsgLen:], &info); err != nil {
			return info, false, fmt.Errorf("read class %x:%x on ifindex %d: %w", handle>>16, handle&0xFFFF, idx, err)
		}
		return info, true, nil
	}
	return info, false, nil
}

// decodeHTBClass reads the kind, rates and priority of a class message's
// attributes (TCA_KIND, TCA_OPTIONS with TCA_HTB_PARMS and the 64-bit
// rates; struct tc_htb_opt is two struct tc_ratespec of 12 bytes, then
// buffer, cbuffer, quantum, level, prio).
func decodeHTBClass(b []byte, info *hierClassInfo) error {
	ad, err := mnl.NewAttributeDecoder(b)
	if err != nil {
		return err
	}
	var kind string
	var rate32, ceil32 uint32
	var rate64, ceil64 uint64
	for ad.Next() {
		switch ad.Type() {
		case unix.TCA_KIND:
			kind = ad.String()
		case unix.TCA_OPTIONS:
			ad.Nested(func(nad *mnl.AttributeDecoder) error {
				for nad.Next() {
					switch nad.Type() {
					case tcaHTBParms:
						p := nad.Bytes()
						if len(p) < 44 {
							return fmt.Errorf("short htb parameters: %d bytes", len(p))
						}
						rate32 = binary.NativeEndian.Uint32(p[8:])
						ceil32 = binary.NativeEndian.Uint32(p[20:])
						info.Prio = uint8(binary.NativeEndian.Uint32(p[40:]))
					case tcaHTBRate64:
						rate64 = nad.Uint64()
					case tcaHTBCeil64:
						ceil64 = nad.Uint64()
					}
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		return err
	}
	if kind != "htb" {
		return fmt.Errorf("class of kind %q, not htb", kind)
	}
	info.RateBytes, info.CeilBytes = max(uint64(rate32), rate64), max(uint64(ceil32), ceil64)
	return nil
}

// bestEffortShare is the best-effort class's rate for a sum of requests:
// what the requests leave of the capacity, plus the floor on top (not a
// max), so that reservedOf reads the sum back exactly.
func bestEffortShare(capacityBytes, reservedBytes uint64) uint64 {
	if reservedBytes >= capacityBytes {
		return hierFloorBytes
	}
	return capacityBytes - reservedBytes + hierFloorBytes
}

// reservedOf is the sum of requests a best-effort share says; exact is
// false when the share is the floor (the sum is the capacity or more, and
// only the classes say how much more).
func reservedOf(capacityBytes, shareBytes uint64) (reservedBytes uint64, exact bool) {
	if shareBytes <= hierFloorBytes {
		return capacityBytes, false
	}
	if shareBytes-hierFloorBytes >= capacityBytes {
		return 0, true
	}
	return capacityBytes + hierFloorBytes - shareBytes, true
}

// hierLedger is one direction of the node hierarchy as admission needs
// it, read from two classes.
type hierLedger struct {
	ifb            int // ifindex of the IFB, 0 when it is missing
	capacityBytes  uint64
	reservedBytes  uint64
	bestEffortRate uint64
	// ok: the IFB has 1:1 and 1:2 and the share is exact; otherwise the
	// caller reads the whole direction (ReadHierarchy).
	ok bool
}

func (s *Shaper) readLedger(d HierDirection) (hierLedger, error) {
	var l hierLedger
	ifb, err := s.linkOrNil(d.IFB())
	if err != nil || ifb == nil {
		return l, err
	}
	l.ifb = ifb.Attrs().Index
	top, ok, err := s.getHierClass(l.ifb, hierTop)
	if err != nil || !ok {
		return l, err
	}
	be, ok, err := s.getHierClass(l.ifb, hierBestEff)
	if err != nil || !ok {
		return l, err
	}
	l.capacityBytes, l.bestEffortRate = top.RateBytes, be.RateBytes
	l.reservedBytes, l.ok = reservedOf(top.RateBytes, be.RateBytes)
	return l, nil
}

// ownClass is a member's class in one direction, as admission counts it:
// its request when it hangs off 1:1, nothing otherwise.
func (s *Shaper) ownClass(ifb int, minor uint16) (HierClass, bool, error) {
	if ifb == 0 || minor == 0 {
		return HierClass{}, false, nil
	}
	c, ok, err := s.getHierClass(ifb, core.BuildHandle(1, uint32(minor)))
	if err != nil || !ok {
		return HierClass{}, false, err
	}
	hc := HierClass{Minor: minor, Guaranteed: c.Parent == hierTop, Leaf: HierLeaf{CeilBytes: c.CeilBytes, Prio: c.Prio}}
	if hc.Guaranteed {
		hc.Leaf.RateBytes = c.RateBytes
	}
	return hc, true, nil
}

// pickMinor finds a minor no class has in either direction, probing from
// a hash of the host veth's name: with n of the 4080 minors taken, about
// 1/(1-n/4080) probes of two class reads each (1.14 at 500 pods).
func (s *Shaper) pickMinor(hostVeth string, ifbs ...int) (uint16, error) {
	h := fnv.New32a()
	h.Write([]byte(hostVeth))
	span := uint32(MaxMinor-MinMinor) + 1
	start := h.Sum32() % span
	for i := uint32(0); i < span; i++ {
		minor := MinMinor + uint16((start+i)%span)
		taken := false
		for _, ifb := range ifbs {
			if ifb == 0 {
				continue
			}
			_, ok, err := s.getHierClass(ifb, core.BuildHandle(1, uint32(minor)))
			if err != nil {
				return 0, err
			}
			if ok {
				taken = true
				break
			}
		}
		if !taken {
			return minor, nil
		}
	}
	return 0, fmt.Errorf("no free class minor: all %d of %#x-%#x are taken", span, MinMinor, MaxMinor)
}
