package nfraw

import (
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// flowtableReply is a GETFLOWTABLE reply as the kernel builds it
// (nf_tables_fill_flowtable_info): table, name, handle, use, hook.
func flowtableReply(t *testing.T, table, name string) netlink.Message {
	t.Helper()
	ae := netlink.NewAttributeEncoder()
	ae.String(attrFlowtableTable, table)
	ae.String(attrFlowtableName, name)
	ae.Uint64(5, 7)                                          // NFTA_FLOWTABLE_HANDLE
	ae.Uint32(4, 1)                                          // NFTA_FLOWTABLE_USE
	ae.Nested(3, func(nae *netlink.AttributeEncoder) error { // NFTA_FLOWTABLE_HOOK
		nae.Uint32(1, 0) // NFTA_FLOWTABLE_HOOK_NUM
		nae.Uint32(2, 0) // NFTA_FLOWTABLE_HOOK_PRIORITY
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return netlink.Message{Data: append(nfgen(unix.NFPROTO_INET), b...)}
}

// The kernels the project runs on have no flowtables
// (CONFIG_NF_FLOW_TABLE unset), so the dump's decoding is checked on
// replies built as the kernel builds them.
func TestParseFlowtables(t *testing.T) {
	got, err := parseFlowtables([]netlink.Message{flowtableReply(t, "filter", "ft"), flowtableReply(t, "fw", "offload")})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != "filter/ft" || got[1] != "fw/offload" {
		t.Errorf("parsed %q, want [filter/ft fw/offload]", got)
	}
	if got, err := parseFlowtables(nil); err != nil || len(got) != 0 {
		t.Errorf("no replies: %q, %v", got, err)
	}
	bad := flowtableReply(t, "filter", "ft")
	bad.Data = bad.Data[:len(bad.Data)-3]
	if _, err := parseFlowtables([]netlink.Message{bad}); err == nil {
		t.Error("a truncated reply parsed")
	}
}
