package kubectl

import (
	"strings"
	"testing"
)

func TestWriteTopOrdersAndCuts(t *testing.T) {
	rates := []Rate{
		{Series: Series{Node: "n1", Namespace: "a", Pod: "slow", Interface: "eth0", Direction: "ingress", LimitBits: 10e6}, Bits: 1e6},
		{Series: Series{Node: "n1", Namespace: "a", Pod: "busy", Interface: "eth0", Direction: "egress", LimitBits: 10e6}, Bits: 9e6, Drops: 1},
		{Series: Series{Node: "n2", Namespace: "b", Pod: "lossy", Interface: "eth0", Direction: "ingress"}, Bits: 2e6, Drops: 50},
	}
	var b strings.Builder
	if err := WriteTop(&b, rates, false, 2); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 3 || !strings.Contains(lines[1], "a/busy") || !strings.Contains(lines[1], "90%") || !strings.Contains(lines[2], "b/lossy") {
		t.Errorf("by throughput, 2 rows:\n%s", b.String())
	}
	b.Reset()
	if err := WriteTop(&b, rates, true, 0); err != nil {
		t.Fatal(err)
	}
	lines = strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 4 || !strings.Contains(lines[1], "b/lossy") || !strings.Contains(lines[1], "50.0") {
		t.Errorf("by drops:\n%s", b.String())
	}
}

func TestShapingKey(t *testing.T) {
	for k, want := range map[string]bool{
		"kubernetes.io/egress-bandwidth": true, "qoscni.io/dscp": true, "qos.projectcalico.org/ingressBandwidth": true,
		"qoscni.io/effective-shaping": false, "app": false,
	} {
		if shapingKey(k) != want {
			t.Errorf("shapingKey(%q) = %v", k, !want)
		}
	}
}

func TestRate(t *testing.T) {
	for bits, want := range map[float64]string{0: "-", 999: "999bit/s", 2049: "2.0kbit/s", 5_001_745: "5.0Mbit/s", 20e6: "20.0Mbit/s", 1.5e9: "1.5Gbit/s"} {
		if got := rate(bits); got != want {
			t.Errorf("rate(%v) = %q, want %q", bits, got, want)
		}
	}
}
