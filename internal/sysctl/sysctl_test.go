package sysctl

import (
	"errors"
	"io/fs"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/testnet"
)

func TestSetInNamespace(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.NewNS(t, "qs")
	fd, err := unix.Open(ns.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	// A '.' in an interface name is no separator in these paths.
	ns.Exec(t, "ip", "link", "add", "d.1", "type", "veth", "peer", "name", "d.2")
	const knob = "net/ipv4/conf/d.1/forwarding"

	ownBefore, err := Get(Current, "net/ipv4/conf/all/forwarding")
	if err != nil {
		t.Fatal(err)
	}
	if v, err := Get(fd, knob); err != nil || v != "0" {
		t.Fatalf("Get in a new namespace = %q, %v; want 0", v, err)
	}
	for range 2 { // the second finds it set and writes nothing
		if err := Set(fd, knob, "1"); err != nil {
			t.Fatal(err)
		}
	}
	if v, err := Get(fd, knob); err != nil || v != "1" {
		t.Fatalf("Get after Set = %q, %v; want 1", v, err)
	}
	if got := strings.TrimSpace(ns.Exec(t, "cat", "/proc/sys/"+knob)); got != "1" {
		t.Errorf("the namespace has %s = %s, want 1", knob, got)
	}
	// The calling thread came back: its own namespace has no d.1 and
	// kept its setting.
	if _, err := Get(Current, knob); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Get(Current) of the namespace's device: %v, want not exist", err)
	}
	if v, _ := Get(Current, "net/ipv4/conf/all/forwarding"); v != ownBefore {
		t.Errorf("own namespace's forwarding went from %s to %s", ownBefore, v)
	}

	if err := SetIfPresent(fd, "net/ipv4/conf/missing0/forwarding", "1"); err != nil {
		t.Errorf("SetIfPresent of a missing setting: %v", err)
	}
	if err := Set(fd, "net/ipv4/conf/missing0/forwarding", "1"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Set of a missing setting: %v, want not exist", err)
	}
}

// The installer's container reaches the node's settings through the
// host's /proc/sys/net mounted elsewhere: what a file there shows is the
// namespace of the thread that opens it, wherever it is mounted.
func TestTreeElsewhere(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.NewNS(t, "qs")
	fd, err := unix.Open(ns.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	root := t.TempDir()
	mnt := root + "/net"
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/proc/sys/net", mnt, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind /proc/sys/net: %v", err)
	}
	defer func() {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	}()
	const knob = "net/ipv4/ip_forward"
	tree := Tree(root)
	own, err := Get(Current, knob)
	if err != nil {
		t.Fatal(err)
	}
	if v, err := tree.Get(fd, knob); err != nil || v != "0" {
		t.Fatalf("Get through the tree in a new namespace = %q, %v; want 0", v, err)
	}
	if err := tree.Set(fd, knob, "1"); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(ns.Exec(t, "cat", "/proc/sys/"+knob)); got != "1" {
		t.Errorf("the namespace has %s = %s, want 1", knob, got)
	}
	if v, _ := Get(Current, knob); v != own {
		t.Errorf("own namespace's %s went from %s to %s", knob, own, v)
	}
	if _, err := tree.Get(fd, "net/ipv4/conf/missing0/forwarding"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Get of a missing setting through the tree: %v, want not exist", err)
	}
}
