package nfraw

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Package nfraw speaks nf_tables netlink directly where google/nftables
// v0.3.0 cannot: it dumps a whole set and rules chain by chain only, and
// it neither writes nor reads stateful expressions on set elements. An ADD
// must not cost O(pods), so the queries it needs are done here: GETSETELEM
// of one exact key (a hash lookup in the kernel; what `nft get element`
// does), one GETRULE dump of a whole table for a base check, and element
// batches whose elements carry their own limit, connlimit and counter.

type Conn struct {
	c *netlink.Conn
}

// Dial opens an nfnetlink socket in the namespace nsFd (-1: the current one).
func Dial(nsFd int) (*Conn, error) {
	cfg := &netlink.Config{}
	if nsFd >= 0 {
		cfg.NetNS = nsFd
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("open nfnetlink socket: %w", err)
	}
	return &Conn{c: c}, nil
}

// Close closes the socket.
func (r *Conn) Close() error { return r.c.Close() }

func nfgen(family byte) []byte { return []byte{family, unix.NFNETLINK_V0, 0, 0} }

func msgType(t int) netlink.HeaderType {
	return netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | t)
}

// Element is what the kernel holds for one key.
type Element struct {
	Key, Val []byte
	// KeyEnd is the last key of an interval element of a concatenated
	// interval set (each field its own range, Key to KeyEnd).
	KeyEnd []byte
	// Jump is the chain of a verdict map element.
	Jump    string
	Comment string
	// Exprs are the element's stateful expressions: *expr.Limit,
	// *expr.Connlimit and *expr.Counter are decoded, others left out.
	Exprs []expr.Any
}

// decodeExpr reads one expression (name and data attributes).
func decodeExpr(b []byte) expr.Any {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil
	}
	var name string
	var data []byte
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_EXPR_NAME:
			name = ad.String()
		case unix.NFTA_EXPR_DATA:
			data = ad.Bytes()
		}
	}
	var x expr.Any
	switch name {
	case "limit":
		x = &expr.Limit{}
	case "connlimit":
		x = &expr.Connlimit{}
	case "counter":
		x = &expr.Counter{}
	default:
		return nil
	}
	if expr.Unmarshal(unix.NFPROTO_INET, data, x) != nil {
		return nil
	}
	return x
}

// GetElem fetches the element with exactly this key; found is false when
// the key, the set or the table does not exist.
func (r *Conn) GetElem(table, set string, key []byte) (el Element, found bool, err error) {
	keyAttr, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.NFTA_DATA_VALUE, Data: key}})
	if err != nil {
		return el, false, err
	}
	item, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_KEY, Data: keyAttr}})
	if err != nil {
		return el, false, err
	}
	list, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: item}})
	if err != nil {
		return el, false, err
	}
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(table + "\x00")},
		{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(set + "\x00")},
		{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS, Data: list},
	})
	if err != nil {
		return el, false, err
	}
	// No NLM_F_ACK: the reply (or an error) is the only answer, so the
	// socket holds nothing stale for the next request.
	msgs, err := r.c.Execute(netlink.Message{
		Header: netlink.Header{Type: msgType(unix.NFT_MSG_GETSETELEM), Flags: netlink.Request},
		Data:   append(nfgen(unix.NFPROTO_INET), attrs...),
	})
	if errors.Is(err, unix.ENOENT) {
		return el, false, nil
	}
	if err != nil {
		return el, false, fmt.Errorf("get element of set %s: %w", set, err)
	}
	for _, m := range msgs {
		els, err := decodeElems(m.Data)
		if err != nil {
			return el, false, fmt.Errorf("decode element of set %s: %w", set, err)
		}
		if len(els) > 0 {
			return els[0], true, nil
		}
	}
	return el, false, nil
}

func decodeElems(data []byte) ([]Element, error) {
	if len(data) < 4 {
		return nil, errors.New("short message")
	}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return nil, err
	}
	var out []Element
	for ad.Next() {
		if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != unix.NFTA_LIST_ELEM {
					continue
				}
				var el Element
				list.Nested(func(e *netlink.AttributeDecoder) error {
					for e.Next() {
						switch e.Type() {
						case unix.NFTA_SET_ELEM_KEY:
							e.Nested(func(v *netlink.AttributeDecoder) error {
								for v.Next() {
									if v.Type() == unix.NFTA_DATA_VALUE {
										el.Key = v.Bytes()
									}
								}
								return nil
							})
						case attrSetElemKeyEnd:
							e.Nested(func(v *netlink.AttributeDecoder) error {
								for v.Next() {
									if v.Type() == unix.NFTA_DATA_VALUE {
										el.KeyEnd = v.Bytes()
									}
								}
								return nil
							})
						case unix.NFTA_SET_ELEM_DATA:
							e.Nested(func(v *netlink.AttributeDecoder) error {
								for v.Next() {
									switch v.Type() {
									case unix.NFTA_DATA_VALUE:
										el.Val = v.Bytes()
									case unix.NFTA_DATA_VERDICT:
										v.Nested(func(d *netlink.AttributeDecoder) error {
											for d.Next() {
												if d.Type() == unix.NFTA_VERDICT_CHAIN {
													el.Jump = d.String()
												}
											}
											return nil
										})
									}
								}
								return nil
							})
						case unix.NFTA_SET_ELEM_USERDATA:
							el.Comment, _ = userdata.GetString(e.Bytes(), userdata.NFTNL_UDATA_SET_ELEM_COMMENT)
						case unix.NFTA_SET_ELEM_EXPR:
							if x := decodeExpr(e.Bytes()); x != nil {
								el.Exprs = append(el.Exprs, x)
							}
						case attrSetElemExpressions:
							e.Nested(func(l *netlink.AttributeDecoder) error {
								for l.Next() {
									if x := decodeExpr(l.Bytes()); x != nil {
										el.Exprs = append(el.Exprs, x)
									}
								}
								return nil
							})
						}
					}
					return nil
				})
				out = append(out, el)
			}
			return nil
		})
	}
	return out, ad.Err()
}

// DumpElems lists every element of a set; a missing table or set is empty.
func (r *Conn) DumpElems(table, set string) ([]Element, error) {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(table + "\x00")},
		{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(set + "\x00")},
	})
	if err != nil {
		return nil, err
	}
	msgs, err := r.c.Execute(netlink.Message{
		Header: netlink.Header{Type: msgType(unix.NFT_MSG_GETSETELEM), Flags: netlink.Request | netlink.Dump},
		Data:   append(nfgen(unix.NFPROTO_INET), attrs...),
	})
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list set %s: %w", set, err)
	}
	var out []Element
	for _, m := range msgs {
		els, err := decodeElems(m.Data)
		if err != nil {
			return nil, fmt.Errorf("decode set %s: %w", set, err)
		}
		out = append(out, els...)
	}
	return out, nil
}

// RuleComments dumps every rule of the table once and returns, per chain,
// the rule comments in order.
func (r *Conn) RuleComments(table string) (map[string][]string, error) {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: []byte(table + "\x00")},
	})
	if err != nil {
		return nil, err
	}
	msgs, err := r.c.Execute(netlink.Message{
		Header: netlink.Header{Type: msgType(unix.NFT_MSG_GETRULE), Flags: netlink.Request | netlink.Dump},
		Data:   append(nfgen(unix.NFPROTO_INET), attrs...),
	})
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list rules of table %s: %w", table, err)
	}
	out := map[string][]string{}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return nil, err
		}
		ad.ByteOrder = binary.BigEndian
		var chain, com string
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_RULE_CHAIN:
				chain = ad.String()
			case unix.NFTA_RULE_USERDATA:
				com, _ = userdata.GetString(ad.Bytes(), userdata.TypeComment)
			}
		}
		if err := ad.Err(); err != nil {
			return nil, err
		}
		out[chain] = append(out[chain], com)
	}
	return out, nil
}

// ChainsHold reports whether each chain of want holds exactly these rule
// comments, in order, with one dump of the table's rules: a base check
// that sees drift, a missing table and an older version alike.
func (r *Conn) ChainsHold(table string, want map[string][]string) (bool, error) {
	have, err := r.RuleComments(table)
	if err != nil {
		return false, err
	}
	return CommentsHold(have, want), nil
}

// CommentsHold says every chain of want has exactly those rule comments
// in have (a RuleComments dump).
func CommentsHold(have, want map[string][]string) bool {
	for chain, w := range want {
		if !slices.Equal(have[chain], w) {
			return false
		}
	}
	return true
}
