package nfraw

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Kernel message and attribute numbers x/sys/unix does not name.
const (
	// msgDestroySetElem deletes an element and, unlike DELSETELEM, is not
	// an error when the element is already gone (Linux 6.3).
	msgDestroySetElem = 30
	// attrSetElemExpressions (NFTA_SET_ELEM_EXPRESSIONS) lists an element's
	// stateful expressions. google/nftables names 0x11 so, which is the
	// set attribute NFTA_SET_EXPR.
	attrSetElemExpressions = 11
	// attrSetElemKeyEnd (NFTA_SET_ELEM_KEY_END, Linux 5.6) is an interval
	// element's last key.
	attrSetElemKeyEnd = 10
	// NFTA_FLOWTABLE_TABLE and NFTA_FLOWTABLE_NAME.
	attrFlowtableTable = 1
	attrFlowtableName  = 2
)

// Batch is one nf_tables transaction of element changes: the kernel
// applies all of it or none.
type Batch struct {
	msgs []netlink.Message
}

// Len is the number of messages queued (each up to elemsPerMsg changes).
func (b *Batch) Len() int { return len(b.msgs) }

// Add queues the elements for set; each carries its key, its data (Val,
// or Jump for a verdict map), its owner comment and its own stateful
// expressions (limit, connlimit, counter...).
func (b *Batch) Add(table, set string, els ...Element) error {
	return b.queue(unix.NFT_MSG_NEWSETELEM, netlink.Create, table, set, els)
}

// Destroy queues the removal of the elements with these keys; a key not
// in the set is no error.
func (b *Batch) Destroy(table, set string, keys ...[]byte) error {
	els := make([]Element, len(keys))
	for i, k := range keys {
		els[i].Key = k
	}
	return b.queue(msgDestroySetElem, 0, table, set, els)
}

// Delete queues the removal of the elements with these keys; unlike
// Destroy it works on kernels before 6.3, and a key not in the set fails
// the whole batch (ENOENT), so callers queue only keys they found.
func (b *Batch) Delete(table, set string, keys ...[]byte) error {
	els := make([]Element, len(keys))
	for i, k := range keys {
		els[i].Key = k
	}
	return b.queue(unix.NFT_MSG_DELSETELEM, 0, table, set, els)
}

// DeleteElements queues the removal of elements by key (and KeyEnd, for
// an interval element), as Delete does.
func (b *Batch) DeleteElements(table, set string, els ...Element) error {
	keys := make([]Element, len(els))
	for i, el := range els {
		keys[i] = Element{Key: el.Key, KeyEnd: el.KeyEnd}
	}
	return b.queue(unix.NFT_MSG_DELSETELEM, 0, table, set, keys)
}

// elemsPerMsg bounds one message's element list, a netlink attribute
// whose length is 16 bits: an element with an owner comment and two
// expressions takes < 320 bytes.
const elemsPerMsg = 150

func (b *Batch) queue(typ int, flags netlink.HeaderFlags, table, set string, els []Element) error {
	for len(els) > elemsPerMsg {
		if err := b.queue(typ, flags, table, set, els[:elemsPerMsg]); err != nil {
			return err
		}
		els = els[elemsPerMsg:]
	}
	if len(els) == 0 {
		return nil
	}
	var list []netlink.Attribute
	for _, el := range els {
		item, err := encodeElem(el)
		if err != nil {
			return fmt.Errorf("encode element of set %s: %w", set, err)
		}
		list = append(list, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: item})
	}
	elems, err := netlink.MarshalAttributes(list)
	if err != nil {
		return err
	}
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(table + "\x00")},
		{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(set + "\x00")},
		{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS, Data: elems},
	})
	if err != nil {
		return err
	}
	b.msgs = append(b.msgs, netlink.Message{
		Header: netlink.Header{Type: msgType(typ), Flags: netlink.Request | netlink.Acknowledge | flags},
		Data:   append(nfgen(unix.NFPROTO_INET), attrs...),
	})
	return nil
}

func nested(typ uint16, attrs ...netlink.Attribute) (netlink.Attribute, error) {
	data, err := netlink.MarshalAttributes(attrs)
	return netlink.Attribute{Type: unix.NLA_F_NESTED | typ, Data: data}, err
}

func encodeElem(el Element) ([]byte, error) {
	key, err := nested(unix.NFTA_SET_ELEM_KEY, netlink.Attribute{Type: unix.NFTA_DATA_VALUE, Data: el.Key})
	if err != nil {
		return nil, err
	}
	attrs := []netlink.Attribute{key}
	if len(el.KeyEnd) > 0 {
		end, err := nested(attrSetElemKeyEnd, netlink.Attribute{Type: unix.NFTA_DATA_VALUE, Data: el.KeyEnd})
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, end)
	}
	switch {
	case el.Jump != "":
		jump := int32(unix.NFT_JUMP)
		code := binary.BigEndian.AppendUint32(nil, uint32(jump))
		verdict, err := nested(unix.NFTA_DATA_VERDICT,
			netlink.Attribute{Type: unix.NFTA_VERDICT_CODE, Data: code},
			netlink.Attribute{Type: unix.NFTA_VERDICT_CHAIN, Data: []byte(el.Jump + "\x00")})
		if err != nil {
			return nil, err
		}
		data, err := nested(unix.NFTA_SET_ELEM_DATA, verdict)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, data)
	case len(el.Val) > 0:
		data, err := nested(unix.NFTA_SET_ELEM_DATA, netlink.Attribute{Type: unix.NFTA_DATA_VALUE, Data: el.Val})
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, data)
	}
	if el.Comment != "" {
		attrs = append(attrs, netlink.Attribute{Type: unix.NFTA_SET_ELEM_USERDATA,
			Data: userdata.AppendString(nil, userdata.NFTNL_UDATA_SET_ELEM_COMMENT, el.Comment)})
	}
	if len(el.Exprs) > 0 {
		var list []netlink.Attribute
		for _, e := range el.Exprs {
			b, err := expr.Marshal(unix.NFPROTO_INET, e)
			if err != nil {
				return nil, err
			}
			list = append(list, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: b})
		}
		exprs, err := nested(attrSetElemExpressions, list...)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, exprs)
	}
	return netlink.MarshalAttributes(attrs)
}

// Send commits the batch as one transaction and returns the first error
// the kernel reported (it then applied nothing).
func (r *Conn) Send(b *Batch) error {
	if len(b.msgs) == 0 {
		return nil
	}
	subsys := make([]byte, 4)
	subsys[1] = unix.NFNETLINK_V0
	binary.BigEndian.PutUint16(subsys[2:], unix.NFNL_SUBSYS_NFTABLES)
	msgs := make([]netlink.Message, 0, len(b.msgs)+2)
	msgs = append(msgs, netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), Flags: netlink.Request}, Data: subsys})
	msgs = append(msgs, b.msgs...)
	msgs = append(msgs, netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_END), Flags: netlink.Request}, Data: subsys})
	if _, err := r.c.SendMessages(msgs); err != nil {
		return fmt.Errorf("send nftables batch: %w", err)
	}
	// Every change asked for an acknowledgement, so the kernel answers
	// each exactly once (an ack or its error), also after a failure: read
	// them all so that nothing is left on the socket for the next request.
	var first error
	for got := 0; got < len(b.msgs); {
		replies, err := r.c.Receive()
		if err != nil {
			var op *netlink.OpError
			if !errors.As(err, &op) {
				return fmt.Errorf("read nftables batch replies: %w", err)
			}
			if first == nil {
				first = err
			}
			got++
			continue
		}
		got += len(replies)
	}
	return first
}

// Flowtables lists the namespace's nftables flowtables as
// "table/flowtable", in every family.
func (r *Conn) Flowtables() ([]string, error) {
	msgs, err := r.c.Execute(netlink.Message{
		Header: netlink.Header{Type: msgType(unix.NFT_MSG_GETFLOWTABLE), Flags: netlink.Request | netlink.Dump},
		Data:   nfgen(unix.NFPROTO_UNSPEC),
	})
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return parseFlowtables(msgs)
}

// parseFlowtables reads the flowtables of a GETFLOWTABLE dump's replies.
func parseFlowtables(msgs []netlink.Message) ([]string, error) {
	var out []string
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return nil, err
		}
		var table, name string
		for ad.Next() {
			switch ad.Type() {
			case attrFlowtableTable:
				table = ad.String()
			case attrFlowtableName:
				name = ad.String()
			}
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("flowtable reply: %w", err)
		}
		out = append(out, table+"/"+name)
	}
	return out, nil
}
