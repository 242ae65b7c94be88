package flock

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"
)

func TestExclusiveBounded(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	held, err := Exclusive(p, 0, "store x")
	if err != nil {
		t.Fatal(err)
	}
	for _, timeout := range []time.Duration{0, 30 * time.Millisecond} {
		start := time.Now()
		l, err := Exclusive(p, timeout, "store x")
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrTryAgainLater {
			l.Unlock()
			t.Fatalf("timeout %s: %v, want a CNI error %d", timeout, err, types.ErrTryAgainLater)
		}
		if want := "store x is locked by another process for " + timeout.String(); te.Msg != want {
			t.Errorf("message %q, want %q", te.Msg, want)
		}
		if took := time.Since(start); took < timeout || took > timeout+2*time.Second {
			t.Errorf("timeout %s: gave up after %s", timeout, took)
		}
	}
	// Released by the holder while a waiter polls: the waiter gets it.
	go func() { time.Sleep(20 * time.Millisecond); held.Unlock() }()
	l, err := Exclusive(p, 5*time.Second, "store x")
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	l.Unlock()
	var none *Lock
	none.Unlock() // a nil lock, as returned with an error, is safe to release
}

func TestExclusiveRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "elsewhere")
	if err := os.Symlink(target, filepath.Join(dir, "lock")); err != nil {
		t.Fatal(err)
	}
	l, err := Exclusive(filepath.Join(dir, "lock"), 0, "x")
	if !errors.Is(err, unix.ELOOP) {
		l.Unlock()
		t.Fatalf("lock through a symlink: %v, want ELOOP", err)
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Errorf("the symlink's target was created")
	}
}

func TestWaitSharedThenExclusive(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	open := func() *os.File {
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	a, b, c := open(), open(), open()
	defer c.Close()
	if err := Wait(int(a.Fd()), unix.LOCK_SH); err != nil {
		t.Fatal(err)
	}
	if err := Wait(int(b.Fd()), unix.LOCK_SH); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- Wait(int(c.Fd()), unix.LOCK_EX) }()
	select {
	case err := <-got:
		t.Fatalf("exclusive lock granted beside two shared ones: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	a.Close()
	b.Close()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}
