package main

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

func TestParseCNIArgsAddsIgnoreUnknownFirst(t *testing.T) {
	got, err := parseCNIArgs("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;")
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", "web"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}

	got, err = parseCNIArgs("IgnoreUnknown=0;A=b=c")
	if err != nil {
		t.Fatal(err)
	}
	want = [][2]string{{"IgnoreUnknown", "0"}, {"A", "b=c"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("explicit IgnoreUnknown: got %v, want %v", got, want)
	}

	if got, err := parseCNIArgs(""); err != nil || got != nil {
		t.Fatalf("empty: got %v, %v", got, err)
	}
	if _, err := parseCNIArgs("novalue"); err == nil {
		t.Fatal("want error for a pair without =")
	}
}

func TestParseValid(t *testing.T) {
	got, err := parseValid("abc/eth0, def/net1")
	if err != nil {
		t.Fatal(err)
	}
	want := []types.GCAttachment{{ContainerID: "abc", IfName: "eth0"}, {ContainerID: "def", IfName: "net1"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if got, err := parseValid(""); err != nil || len(got) != 0 {
		t.Fatalf("empty: got %v, %v", got, err)
	}
	for _, bad := range []string{"abc", "/eth0", "abc/"} {
		if _, err := parseValid(bad); err == nil {
			t.Errorf("parseValid(%q): want error", bad)
		}
	}
}

func TestParseCapArgs(t *testing.T) {
	m, err := parseCapArgs(`{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}],"bandwidth":{"ingressRate":1000}}`)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m["portMappings"]; !ok {
		t.Fatalf("portMappings missing: %v", m)
	}
	if _, err := parseCapArgs(`[1,2]`); err == nil {
		t.Fatal("want error for a JSON array")
	}
}

func TestReportErrorPrintsCNIErrorJSON(t *testing.T) {
	var buf bytes.Buffer
	cniErr := &types.Error{Code: 11, Msg: "try again", Details: "lock busy"}
	reportError(&buf, "add", errors.Join(errors.New("plugin qoscni"), cniErr))
	out := buf.String()
	if !strings.Contains(out, "qoscni-cnitool add:") || !strings.Contains(out, `"code":11`) {
		t.Fatalf("unexpected output:\n%s", out)
	}
}
