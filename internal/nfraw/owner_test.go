package nfraw

import (
	"strings"
	"testing"
)

func TestOwnerEncoding(t *testing.T) {
	o := Owner{ContainerID: "abc", IfName: "eth0", PodNamespace: "ns", PodName: "web-0"}
	got, ok := DecodeOwner(EncodeOwner(o))
	if !ok || got != o {
		t.Fatalf("round trip %+v -> %+v", o, got)
	}
	long := Owner{ContainerID: strings.Repeat("a", 64), IfName: "eth0", PodNamespace: strings.Repeat("n", 63), PodName: strings.Repeat("p", 253)}
	enc := EncodeOwner(long)
	got, ok = DecodeOwner(enc)
	if len(enc) > maxComment || !ok || !got.Same(long) {
		t.Fatalf("long owner: %d bytes, %+v", len(enc), got)
	}
	if _, ok := DecodeOwner("garbage"); ok {
		t.Fatal("garbage decoded as an owner")
	}
	if s := o.String(); !strings.Contains(s, "ns/web-0") {
		t.Errorf("owner string %q", s)
	}
}
