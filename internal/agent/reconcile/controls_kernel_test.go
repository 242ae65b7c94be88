package reconcile_test

import (
	"regexp"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/shaping"
)

// TestControlsReshapeLive: packet-rate, connection and DSCP annotations
// added, changed (Calico's names too) and removed on a running pod follow
// into nftables and the record; a bad value keeps what the pod has; an
// `nft flush ruleset` is repaired on the next pass.
func TestControlsReshapeLive(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{configure: func(e *env, c *reconcile.Config) {
		c.Repairers = []reconcile.KernelRepairer{controls.NewRepairer(c.NetnsFd, nil)}
	}})
	_, rec := e.addPod("ctl", nil)
	if rec.Controls != nil {
		t.Fatalf("controls at ADD without annotations: %+v", rec.Controls)
	}
	ip := strings.SplitN(rec.IPs[0], "/", 2)[0]
	table := func() string { return e.node.Exec(t, "nft", "list", "table", "inet", "qoscni") }
	// The packet rate's element: its counter, then its limit.
	rate := func(out, limit string) bool {
		return regexp.MustCompile(regexp.QuoteMeta(ip) + ` counter packets \d+ bytes \d+ ` + regexp.QuoteMeta(limit)).MatchString(out)
	}
	e.annotate("ctl", map[string]string{shaping.AnnotationIngressPacketRate: "3k", shaping.CalicoDSCP: "AF41"})
	e.waitRecord(rec.ContainerID, "packet rate and DSCP added", func(r *state.Record) bool {
		return r.Controls != nil && r.Controls.Ingress != nil && r.Controls.Ingress.PacketRate == 3000 && r.Controls.DSCP != nil && *r.Controls.DSCP == 34
	})
	if out := table(); !rate(out, "limit rate over 3000/second") || !strings.Contains(out, "jump dscp-34") {
		t.Fatalf("nftables after the annotation:\n%s", out)
	}
	e.annotate("ctl", map[string]string{shaping.CalicoIngressPacketRate: "500", shaping.CalicoIngressPacketBurst: "50",
		shaping.CalicoEgressMaxConnections: "7"})
	e.waitRecord(rec.ContainerID, "Calico's names", func(r *state.Record) bool {
		c := r.Controls
		return c != nil && c.Ingress != nil && c.Ingress.PacketRate == 500 && c.Ingress.PacketBurst == 50 &&
			c.Egress != nil && c.Egress.MaxConnections == 7 && c.DSCP == nil
	})
	out := table()
	if !rate(out, "limit rate over 500/second burst 50 packets") || !strings.Contains(out, ip+" ct count over 7") || strings.Contains(out, "jump dscp-34") {
		t.Fatalf("nftables after Calico's names:\n%s", out)
	}
	// A bad value: the pod keeps its controls.
	e.annotate("ctl", map[string]string{shaping.CalicoIngressPacketRate: "500", shaping.CalicoIngressPacketBurst: "50",
		shaping.CalicoEgressMaxConnections: "7", shaping.AnnotationDSCP: "AF99"})
	e.pass()
	if r := e.record(rec.ContainerID); r.Controls == nil || r.Controls.Egress == nil || r.Controls.Egress.MaxConnections != 7 {
		t.Fatalf("a bad DSCP changed the controls: %+v", r.Controls)
	}
	// Drift: the ruleset is flushed; the pass puts it back.
	e.node.Exec(t, "nft", "flush", "ruleset")
	if res := e.pass(); res.Repaired == 0 {
		t.Errorf("pass after nft flush ruleset repaired nothing: %+v", res)
	}
	if out := table(); !strings.Contains(out, ip+" ct count over 7") {
		t.Fatalf("not repaired:\n%s", out)
	}
	e.annotate("ctl", map[string]string{"unrelated": "x"})
	e.waitRecord(rec.ContainerID, "controls removed", func(r *state.Record) bool { return r.Controls == nil })
	if out := table(); strings.Contains(out, ip+" ") {
		t.Fatalf("elements left after the annotations went:\n%s", out)
	}
}
