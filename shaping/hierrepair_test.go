package shaping

import (
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/state"
)

// Two records that claim one host veth or one class minor are one pod:
// the newer one. Restoring both would move the class back and forth on
// every pass.
func TestMembersOfOnePodPerVethAndMinor(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 9, 0, 0, 0, time.UTC)
	rec := func(id, veth string, minor uint16, request uint64, age time.Duration) *state.Record {
		g := guaranteeOf(request, 100_000_000, PriorityNormal)
		return &state.Record{ContainerID: id, HostVeth: veth, Created: t0.Add(-age),
			Shaping: &state.Shaping{Guarantee: GuaranteeToRecord(g, minor)}}
	}
	live := []*state.Record{
		rec("old-a", "qva", 0x20, 57_000_000, time.Hour),
		rec("b", "qvb", 0x21, 19_000_000, time.Minute),
		rec("new-a", "qva", 0x20, 570_000_000, time.Second),
		rec("older-a", "qva", 0x20, 5_000_000, 2*time.Hour),
		rec("c", "qvc", 0x21, 1_000_000, time.Hour), // b's minor, older than b
	}
	members, _ := membersOf(live)
	got := map[string]bool{}
	for _, m := range members {
		got[m.rec.ContainerID] = true
	}
	if len(members) != 2 || !got["new-a"] || !got["b"] {
		t.Errorf("members %v, want new-a and b", got)
	}
}
