package cniconf

import (
	"strings"
	"testing"
)

func TestNodeBandwidth(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"05-other.conflist": `{"cniVersion":"1.0.0","name":"flannel","plugins":[{"type":"flannel","nodeCapacity":"x"}]}`,
		"10-qoscni.conflist": `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"qoscni",
			"nodeCapacity":{"ingress":"2G","egress":"1G"},"ceilings":{"maxRequest":"400M"}}]}`,
		"20-second.conf": `{"cniVersion":"1.0.0","name":"second","type":"qoscni","nodeCapacity":{"egress":"9G"}}`,
	})
	b, found, err := NodeBandwidth(dir)
	if err != nil || !found || b.Capacity.IngressBits != 2e9 || b.Capacity.EgressBits != 1e9 || b.MaxRequestBits != 400e6 ||
		!strings.HasSuffix(b.File, "10-qoscni.conflist") {
		t.Fatalf("NodeBandwidth = %+v %v %v", b, found, err)
	}

	// Off when qoscni's entry has no capacity; nothing when no entry.
	b, found, err = NodeBandwidth(writeFiles(t, map[string]string{"10.conf": `{"cniVersion":"1.0.0","name":"n","type":"qoscni"}`}))
	if err != nil || !found || b.Capacity.IngressBits != 0 || b.Capacity.EgressBits != 0 {
		t.Fatalf("no capacity: %+v %v %v", b, found, err)
	}
	if _, found, err = NodeBandwidth(t.TempDir()); found || err != nil {
		t.Fatalf("empty dir: %v %v", found, err)
	}

	// A bad value names its file and field.
	_, _, err = NodeBandwidth(writeFiles(t, map[string]string{"10.conf": `{"cniVersion":"1.0.0","name":"n","type":"qoscni","nodeCapacity":{"egress":"fast"}}`}))
	if err == nil || !strings.Contains(err.Error(), "10.conf") || !strings.Contains(err.Error(), "nodeCapacity.egress") {
		t.Fatalf("bad value: %v", err)
	}
}
