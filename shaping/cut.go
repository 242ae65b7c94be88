package shaping

import (
	"bytes"
	"encoding/binary"
	"math"
	"time"

	"github.com/florianl/go-tc"
	mnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TCA_TBF_* of linux/pkt_sched.h.
const (
	tcaTBFParms  = 1
	tcaTBFRate64 = 4
	tcaTBFBurst  = 6
)

// setCutTBF makes (or changes) the TBF at handle under parent that cuts
// every packet above cut bytes into frames and queues at most limit
// bytes, at hierCutRate. It is written here, not with go-tc: go-tc v0.4.4
// writes TBF's rate in 32 bits only (no TCA_TBF_RATE64) and needs a rate
// table the kernel does not. TCA_TBF_BURST gives the bucket in bytes,
// which is also the largest packet TBF takes whole (its max_size).
func (s *Shaper) setCutTBF(idx int, handle, parent uint32, cut, limit uint64) error {
	var parms bytes.Buffer
	qopt := tc.TbfQopt{
		// The kernel takes the larger of the 32-bit rate and RATE64.
		Rate:  tc.RateSpec{Rate: math.MaxUint32, Linklayer: linkEthernet},
		Limit: uint32(min(limit, math.MaxUint32)),
	}
	if err := binary.Write(&parms, binary.NativeEndian, qopt); err != nil {
		return err
	}
	ae := mnl.NewAttributeEncoder()
	ae.String(unix.TCA_KIND, "tbf")
	ae.Nested(unix.TCA_OPTIONS, func(n *mnl.AttributeEncoder) error {
		n.Bytes(tcaTBFParms, parms.Bytes())
		n.Uint64(tcaTBFRate64, hierCutRate)
		n.Uint32(tcaTBFBurst, uint32(min(cut, math.MaxUint32)))
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return err
	}
	req := make([]byte, tcmsgLen, tcmsgLen+len(attrs))
	req[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(req[4:], uint32(idx))
	binary.NativeEndian.PutUint32(req[8:], handle)
	binary.NativeEndian.PutUint32(req[12:], parent)
	if err := s.rt.SetReadDeadline(time.Now().Add(getClassTimeout)); err != nil {
		return err
	}
	_, err = s.rt.Execute(mnl.Message{
		Header: mnl.Header{Type: unix.RTM_NEWQDISC, Flags: mnl.Request | mnl.Acknowledge | mnl.Create | mnl.Replace},
		Data:   append(req, attrs...),
	})
	return err
}
