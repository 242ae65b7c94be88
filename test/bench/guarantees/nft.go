package main

import (
	"fmt"
	"net"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// nftSource counts forwarded IPv4 packets per source address in a table
// of its own (the benchmark's node netns; qoscni's table is not touched).
// The forward hook comes after the pod's egress shaping, so it counts what
// the shaper let out of the pod.
type nftSource struct {
	conn  *nftables.Conn
	table *nftables.Table
	chain *nftables.Chain
	n     int
}

func newNftSource(saddrs []string) (*nftSource, error) {
	conn, err := nftables.New()
	if err != nil {
		return nil, err
	}
	s := &nftSource{conn: conn, n: len(saddrs)}
	s.table = conn.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: fmt.Sprintf("qgbench%d", os.Getpid())})
	s.chain = conn.AddChain(&nftables.Chain{Name: "fwd", Table: s.table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter})
	for _, a := range saddrs {
		ip := net.ParseIP(a).To4()
		if ip == nil {
			return nil, fmt.Errorf("%q is no IPv4 address", a)
		}
		conn.AddRule(&nftables.Rule{Table: s.table, Chain: s.chain, Exprs: []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ip},
			&expr.Counter{},
		}})
	}
	if err := conn.Flush(); err != nil {
		return nil, fmt.Errorf("create counting table: %w", err)
	}
	return s, nil
}

// Read returns each source's forwarded bytes, in the order given (rules
// come back in the order they were appended).
func (s *nftSource) Read() ([]uint64, error) {
	rules, err := s.conn.GetRules(s.table, s.chain)
	if err != nil {
		return nil, err
	}
	if len(rules) != s.n {
		return nil, fmt.Errorf("counting chain has %d rules, want %d", len(rules), s.n)
	}
	out := make([]uint64, s.n)
	for i, r := range rules {
		for _, e := range r.Exprs {
			if c, ok := e.(*expr.Counter); ok {
				out[i] = c.Bytes
			}
		}
	}
	return out, nil
}

func (s *nftSource) Close() error {
	s.conn.DelTable(s.table)
	return s.conn.Flush()
}
