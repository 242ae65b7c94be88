package grant

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const pod = "0b5c7f0e-1f6e-4c53-9a39-3d1f2a6c7e11"

func TestWriteSumRemove(t *testing.T) {
	dir := t.TempDir()
	if tot, err := ForPod(dir, pod); err != nil || !tot.Empty() {
		t.Fatalf("no grant yet: %+v %v", tot, err)
	}
	if err := Write(dir, pod, "c1", Grant{Claim: "ns/web-bw", EgressBits: 400e6}); err != nil {
		t.Fatal(err)
	}
	if err := Write(dir, pod, "c2", Grant{Claim: "ns/web-in", IngressBits: 100e6, EgressBits: 50e6}); err != nil {
		t.Fatal(err)
	}
	// A temporary file of a writer that crashed is not a grant.
	if err := os.WriteFile(filepath.Join(dir, pod, ".tmp-abc"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	tot, err := ForPod(dir, pod)
	if err != nil || tot.IngressBits != 100e6 || tot.EgressBits != 450e6 || !slices.Equal(tot.Claims, []string{"ns/web-bw", "ns/web-in"}) {
		t.Fatalf("sum: %+v %v", tot, err)
	}
	// A claim prepared again (the kubelet retries) replaces its grant.
	if err := Write(dir, pod, "c1", Grant{Claim: "ns/web-bw", EgressBits: 300e6}); err != nil {
		t.Fatal(err)
	}
	if tot, _ = ForPod(dir, pod); tot.EgressBits != 350e6 {
		t.Fatalf("after rewriting c1: %+v", tot)
	}
	if pods, err := Pods(dir); err != nil || !slices.Equal(pods, []string{pod}) {
		t.Fatalf("Pods: %v %v", pods, err)
	}
	if err := Remove(dir, pod, "c1"); err != nil {
		t.Fatal(err)
	}
	if err := Remove(dir, pod, "c1"); err != nil {
		t.Fatalf("removing twice: %v", err)
	}
	os.Remove(filepath.Join(dir, pod, ".tmp-abc"))
	if err := Remove(dir, pod, "c2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, pod)); !os.IsNotExist(err) {
		t.Fatalf("the pod's directory stayed after its last claim: %v", err)
	}
}

func TestRemovePod(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []string{"c1", "c2"} {
		if err := Write(dir, pod, c, Grant{EgressBits: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := RemovePod(dir, pod); err != nil {
		t.Fatal(err)
	}
	if pods, err := Pods(dir); err != nil || len(pods) != 0 {
		t.Fatalf("after RemovePod: %v %v", pods, err)
	}
	if err := RemovePod(dir, "../x"); err == nil {
		t.Fatal("RemovePod climbed out of its directory")
	}
}

func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	for _, bad := range []string{"", "..", "../etc", "a/b", ".hidden", strings.Repeat("a", 129)} {
		if err := Write(dir, bad, "c1", Grant{}); err == nil {
			t.Errorf("pod UID %q accepted", bad)
		}
		if err := Write(dir, pod, bad, Grant{}); err == nil {
			t.Errorf("claim UID %q accepted", bad)
		}
	}
	if tot, err := ForPod(dir, ""); err != nil || !tot.Empty() {
		t.Errorf("no pod UID (a runtime without K8S_POD_UID): %+v %v", tot, err)
	}
	if _, err := ForPod(dir, "../x"); err == nil {
		t.Error("ForPod climbed out of its directory")
	}
	if err := os.MkdirAll(filepath.Join(dir, pod), 0o755); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, pod, "c9.json")
	if err := os.WriteFile(bad, []byte(`{"egressBits":"lots"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ForPod(dir, pod); err == nil || !strings.Contains(err.Error(), bad) {
		t.Errorf("a grant that does not decode: %v", err)
	}
}

func TestTooManyClaims(t *testing.T) {
	dir := t.TempDir()
	for i := 0; i <= maxClaims; i++ {
		if err := Write(dir, pod, "c"+strings.Repeat("x", i+1), Grant{EgressBits: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ForPod(dir, pod); err == nil {
		t.Fatal("more than maxClaims read")
	}
}

func TestRemoveClaim(t *testing.T) {
	dir := t.TempDir()
	other := "7a1d9e52-0c1b-4d8e-8f3a-5b2c6d9e0f12"
	for _, w := range []struct{ pod, claim string }{{pod, "c1"}, {pod, "c2"}, {other, "c1"}} {
		if err := Write(dir, w.pod, w.claim, Grant{EgressBits: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := RemoveClaim(dir, "c1"); err != nil || n != 2 {
		t.Fatalf("RemoveClaim c1: %d %v", n, err)
	}
	if tot, _ := ForPod(dir, pod); !slices.Equal(tot.Claims, []string{"c2"}) {
		t.Fatalf("pod kept %v, want only c2", tot.Claims)
	}
	if _, err := os.Stat(filepath.Join(dir, other)); !os.IsNotExist(err) {
		t.Fatalf("the other pod's directory stayed after its only claim went: %v", err)
	}
	if n, err := RemoveClaim(dir, "c1"); err != nil || n != 0 {
		t.Fatalf("removing again: %d %v", n, err)
	}
	if _, err := RemoveClaim(dir, "../c2"); err == nil {
		t.Fatal("a claim UID that climbs out was accepted")
	}
	if n, err := RemoveClaim(filepath.Join(dir, "none"), "c1"); err != nil || n != 0 {
		t.Fatalf("no directory: %d %v", n, err)
	}
}

// TestIsUID: the hand-written check accepts exactly what the pattern
// ^[0-9A-Za-z][0-9A-Za-z-]{0,127}$ does.
func TestIsUID(t *testing.T) {
	pattern := regexp.MustCompile(`^[0-9A-Za-z][0-9A-Za-z-]{0,127}$`)
	cases := []string{"", "-", "a", "-a", "a-", "0", "Z9-x", "a/b", "..", ".", "a b", "é", "a\x00",
		"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", strings.Repeat("a", 128), strings.Repeat("a", 129),
		"a" + strings.Repeat("-", 127), "a" + strings.Repeat("-", 128), "a_b", "A:B"}
	for c := byte(0); c < 128; c++ {
		cases = append(cases, string([]byte{'a', c}), string([]byte{c}))
	}
	for _, v := range cases {
		if got, want := isUID(v), pattern.MatchString(v); got != want {
			t.Errorf("isUID(%q) = %v, the pattern says %v", v, got, want)
		}
	}
}

func FuzzIsUID(f *testing.F) {
	pattern := regexp.MustCompile(`^[0-9A-Za-z][0-9A-Za-z-]{0,127}$`)
	f.Add("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
	f.Add("-x")
	f.Fuzz(func(t *testing.T, v string) {
		if got, want := isUID(v), pattern.MatchString(v); got != want {
			t.Errorf("isUID(%q) = %v, the pattern says %v", v, got, want)
		}
	})
}
