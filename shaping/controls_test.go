package shaping

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/state"
)

func TestParseControls(t *testing.T) {
	u8 := func(v uint8) *uint8 { return &v }
	for _, tc := range []struct {
		name string
		a    map[string]string
		want *state.Controls
		bad  string // the annotation the error must name
	}{
		{name: "none", a: annotations("kubernetes.io/ingress-bandwidth", "10M")},
		{name: "packet rate, default burst", a: annotations(AnnotationEgressPacketRate, "1k"),
			want: &state.Controls{Egress: &state.ControlDirection{PacketRate: 1000, PacketBurst: 5}}},
		{name: "beyond Calico's 10k", a: annotations(AnnotationIngressPacketRate, "2M", AnnotationIngressPacketBurst, "50k"),
			want: &state.Controls{Ingress: &state.ControlDirection{PacketRate: 2_000_000, PacketBurst: 50_000}}},
		{name: "connections", a: annotations(CalicoIngressMaxConnections, "10", AnnotationEgressMaxConnections, "4294967295"),
			want: &state.Controls{Ingress: &state.ControlDirection{MaxConnections: 10}, Egress: &state.ControlDirection{MaxConnections: 1<<32 - 1}}},
		{name: "qoscni's name wins over Calico's", a: annotations(AnnotationEgressPacketRate, "100", CalicoEgressPacketRate, "200"),
			want: &state.Controls{Egress: &state.ControlDirection{PacketRate: 100, PacketBurst: 5}}},
		{name: "dscp name", a: annotations(CalicoDSCP, "ef"), want: &state.Controls{DSCP: u8(46)}},
		{name: "dscp number", a: annotations(AnnotationDSCP, "63"), want: &state.Controls{DSCP: u8(63)}},
		{name: "dscp zero is a setting", a: annotations(AnnotationDSCP, "DF"), want: &state.Controls{DSCP: u8(0)}},
		{name: "dscp 64", a: annotations(AnnotationDSCP, "64"), bad: AnnotationDSCP},
		{name: "dscp name unknown", a: annotations(CalicoDSCP, "AF44"), bad: CalicoDSCP},
		{name: "rate 0", a: annotations(AnnotationIngressPacketRate, "0"), bad: AnnotationIngressPacketRate},
		{name: "rate too high", a: annotations(CalicoEgressPacketRate, "11M"), bad: CalicoEgressPacketRate},
		{name: "rate not a number", a: annotations(AnnotationEgressPacketRate, "fast"), bad: AnnotationEgressPacketRate},
		{name: "burst without rate", a: annotations(CalicoIngressPacketBurst, "10"), bad: CalicoIngressPacketBurst},
		{name: "connections 0", a: annotations(AnnotationEgressMaxConnections, "0"), bad: AnnotationEgressMaxConnections},
		{name: "connections beyond 32 bits", a: annotations(CalicoEgressMaxConnections, "4294967296"), bad: CalicoEgressMaxConnections},
		{name: "negative", a: annotations(AnnotationIngressMaxConnections, "-1"), bad: AnnotationIngressMaxConnections},
	} {
		got, err := ParseControls(tc.a)
		if tc.bad != "" {
			var e *types.Error
			if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, tc.bad) {
				t.Errorf("%s: error %v, want code 7 naming %s", tc.name, err, tc.bad)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if !sameControls(got, tc.want) {
			t.Errorf("%s: got %s, want %s", tc.name, describe(got), describe(tc.want))
		}
	}
}

func sameControls(a, b *state.Controls) bool { return describe(a) == describe(b) }

func describe(c *state.Controls) string {
	if c == nil {
		return "none"
	}
	dscp := "-"
	if c.DSCP != nil {
		dscp = fmt.Sprint(*c.DSCP)
	}
	return fmt.Sprintf("in %+v eg %+v dscp %s", c.Ingress, c.Egress, dscp)
}
