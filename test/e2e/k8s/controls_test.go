package k8s_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/state"
)

// openConns holds three connections to the workload's TCP port open and
// then tries a fourth: "3 open, 4th refused" when the pod's bound of three
// holds, "4 open" when there is none. The workload writes a line at accept
// and keeps the connection for 5 s, long enough for this. A refusal is a
// TCP reset: a fourth left unanswered is reported as such.
const openConns = `ip=$1
for fd in 3 4 5; do eval "exec $fd<>/dev/tcp/$ip/8080"; done
timeout 5 bash -c ": 6<>/dev/tcp/$ip/8080" 2>/dev/null
case $? in 0) fourth=open ;; 124) fourth=unanswered ;; *) fourth=refused ;; esac
for fd in 3 4 5; do read -t 3 line <&$fd || { echo "connection $fd dropped"; exit 1; }; done
echo "3 open, 4th $fourth"`

// controlsStep: a connection bound and a DSCP annotated on the running
// shaped pod reach nftables through the agent; a fourth connection from
// the node and from the second node (routed across) is refused while three
// stay up, the refusals are exported, and removing the annotation lifts
// the bound; then a packet rate (packetRate).
func (e *env) controlsStep(t *testing.T) {
	ip := podIPv4(t, shapedRec)
	e.kc(t, "annotate", "--overwrite", "pod", shaped.Name, "qoscni.io/ingress-max-connections=3", "qos.projectcalico.org/dscp=EF")
	d := waitFor(t, 10*time.Second, "controls in the record and nftables", func() error {
		rec := e.record(t, shaped.Name)
		if rec == nil || rec.Controls == nil || rec.Controls.Ingress == nil || rec.Controls.Ingress.MaxConnections != 3 ||
			rec.Controls.DSCP == nil || *rec.Controls.DSCP != 46 {
			return fmt.Errorf("record: %+v", recControls(rec))
		}
		out, err := e.tryHere("nft", "list", "set", "inet", "qoscni", "conn-ingress4")
		if err != nil || !strings.Contains(out, ip+" ct count over 3") {
			return fmt.Errorf("nft: %s %v", out, err)
		}
		return nil
	})
	t.Logf("timing: annotate -> nftables in %v", d.Round(time.Millisecond))
	for _, from := range []struct {
		name string
		try  func(args ...string) (string, error)
	}{{"node", e.tryHere}, {"second node", e.tryOn}} {
		out, err := from.try("timeout", "20", "bash", "-c", openConns, "-", ip)
		if err != nil || strings.TrimSpace(out) != "3 open, 4th refused" {
			t.Errorf("from the %s with a bound of 3: %q %v", from.name, out, err)
		}
		// The workload closes each after 5 s; until then they count.
		time.Sleep(6 * time.Second)
	}
	waitFor(t, 10*time.Second, "refusals exported", func() error {
		v, err := scrape(e.n.Client, e.n.IP, "qoscni_control_refused_connections_total", shaped.Name, "ingress")
		if err != nil {
			return err
		}
		if v < 2 {
			return fmt.Errorf("refused %v, want 2", v)
		}
		return nil
	})
	e.kc(t, "annotate", "pod", shaped.Name, "qoscni.io/ingress-max-connections-", "qos.projectcalico.org/dscp-")
	waitFor(t, 10*time.Second, "controls lifted", func() error {
		if rec := e.record(t, shaped.Name); rec == nil || rec.Controls != nil {
			return fmt.Errorf("record: %+v", recControls(rec))
		}
		return nil
	})
	if out, err := e.tryHere("timeout", "20", "bash", "-c", openConns, "-", ip); err != nil || strings.TrimSpace(out) != "3 open, 4th open" {
		t.Errorf("bound lifted: %q %v", out, err)
	}
	e.packetRate(t, ip)
}

// packetRate: Calico's packet-rate name on the running pod; 400 echo
// requests from the second node, 2 ms apart, meet a rate of 100/s: no
// more than the rate passes over the time ping took, and the agent
// exports what the rate met and dropped.
func (e *env) packetRate(t *testing.T, ip string) {
	e.kc(t, "annotate", "--overwrite", "pod", shaped.Name, "qos.projectcalico.org/ingressPacketRate=100")
	waitFor(t, 10*time.Second, "packet rate in nftables", func() error {
		out, err := e.tryHere("nft", "list", "set", "inet", "qoscni", "pkt-ingress4")
		if err != nil || !strings.Contains(out, "limit rate over 100/second") {
			return fmt.Errorf("nft: %s %v", out, err)
		}
		return nil
	})
	out, _ := e.tryOn("ping", "-q", "-n", "-c", "400", "-i", "0.002", "-W", "1", ip)
	var sent, got, ms int
	i := strings.Index(out, " packets transmitted, ")
	if i < 0 {
		t.Fatalf("ping: %s", out)
	}
	line := out[strings.LastIndex(out[:i], "\n")+1:]
	if _, err := fmt.Sscanf(line, "%d packets transmitted, %d received", &sent, &got); err != nil {
		t.Fatalf("ping: %v in %s", err, out)
	}
	if j := strings.Index(line, "time "); j < 0 {
		t.Fatalf("ping printed no time: %s", out)
	} else if _, err := fmt.Sscanf(line[j:], "time %dms", &ms); err != nil {
		t.Fatalf("ping: %v in %s", err, out)
	}
	// At most the rate over the time ping took, the bucket of 5, and a
	// fifth more for the clock of a loaded machine.
	most := 100*float64(ms)/1000*1.2 + 5
	t.Logf("packet rate 100/s: %d of %d echo requests answered in %d ms (at most %.0f allowed)", got, sent, ms, most)
	if sent != 400 || got < 5 || float64(got) > most {
		t.Errorf("%d of %d answered at 100 packets/s in %d ms, want 5 to %.0f", got, sent, ms, most)
	}
	waitFor(t, 10*time.Second, "packets met and dropped exported", func() error {
		met, err := scrape(e.n.Client, e.n.IP, "qoscni_control_offered_packets_total", shaped.Name, "ingress")
		if err != nil {
			return err
		}
		dropped, err := scrape(e.n.Client, e.n.IP, "qoscni_control_dropped_packets_total", shaped.Name, "ingress")
		if err != nil {
			return err
		}
		if met < float64(sent) || dropped < float64(sent-got) || dropped > met {
			return fmt.Errorf("met %v, dropped %v; %d sent, %d answered", met, dropped, sent, got)
		}
		return nil
	})
	e.kc(t, "annotate", "pod", shaped.Name, "qos.projectcalico.org/ingressPacketRate-")
	waitFor(t, 10*time.Second, "packet rate lifted", func() error {
		if rec := e.record(t, shaped.Name); rec == nil || rec.Controls != nil {
			return fmt.Errorf("record: %+v", recControls(rec))
		}
		return nil
	})
}

func recControls(rec *state.Record) any {
	if rec == nil {
		return "no record"
	}
	return rec.Controls
}
