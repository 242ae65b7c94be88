package state

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"
)

func TestSaveLoadListDelete(t *testing.T) {
	s := New(filepath.Join(t.TempDir(), "state"))
	r := &Record{Network: "net", ContainerID: "abc", IfName: "eth0", HostVeth: "qv1", Pod: Pod{Namespace: "ns", Name: "p", UID: "u"},
		Mode: ModeStandalone, IPs: []string{"10.0.0.2/24"}, Created: time.Unix(100, 0).UTC()}
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load(r.Key())
	if err != nil || got == nil {
		t.Fatalf("Load: %v %v", got, err)
	}
	if got.Pod != r.Pod || got.HostVeth != "qv1" || got.Schema != SchemaVersion || got.IPs[0] != "10.0.0.2/24" {
		t.Errorf("round trip: %+v", got)
	}
	st, _ := os.Stat(s.path(r.Key()))
	if st.Mode().Perm() != 0o600 {
		t.Errorf("file mode %v", st.Mode().Perm())
	}
	dst, _ := os.Stat(filepath.Dir(s.path(r.Key())))
	if dst.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v", dst.Mode().Perm())
	}
	// A second network and a garbage file.
	r2 := *r
	r2.Network = "other"
	if err := s.Save(&r2); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.Dir, "net", "junk.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	recs, bad, err := s.List("net")
	if err != nil || len(recs) != 1 || len(bad) != 1 {
		t.Fatalf("List(net): %d records, %d bad, %v", len(recs), len(bad), err)
	}
	all, _, _ := s.List("")
	if len(all) != 2 {
		t.Fatalf("List(all): %d", len(all))
	}
	if err := s.Delete(r.Key()); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(r.Key()); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if got, err := s.Load(r.Key()); got != nil || err != nil {
		t.Fatalf("after Delete: %v %v", got, err)
	}
	// No temporary files left behind.
	entries, _ := os.ReadDir(filepath.Join(s.Dir, "net"))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temp file left: %s", e.Name())
		}
	}
}

func TestHostileNamesStayInside(t *testing.T) {
	s := New(t.TempDir())
	r := &Record{Network: "../../etc", ContainerID: "../x", IfName: "a/b", HostVeth: "v"}
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	p := s.path(r.Key())
	if !strings.HasPrefix(p, s.Dir+"/") || strings.Contains(strings.TrimPrefix(p, s.Dir), "/../") {
		t.Fatalf("path escapes the store: %s", p)
	}
	if got, err := s.Load(r.Key()); err != nil || got == nil || got.ContainerID != "../x" {
		t.Fatalf("Load: %+v %v", got, err)
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, in := range []string{``, `{}`, `{"schema":99,"network":"n","containerID":"c","ifName":"i"}`,
		`{"schema":1,"network":"n","containerID":"","ifName":"i"}`, `[1,2]`} {
		if _, err := Decode([]byte(in)); err == nil {
			t.Errorf("Decode(%q) accepted", in)
		}
	}
}

func TestLoadCorrupt(t *testing.T) {
	s := New(t.TempDir())
	k := Key{"n", "c", "eth0"}
	if err := os.MkdirAll(filepath.Dir(s.path(k)), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.path(k), []byte(`{"schema":1,"netw`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(k); err == nil || !strings.Contains(err.Error(), "c/eth0") || !strings.Contains(err.Error(), s.Path(k)) {
		t.Fatalf("corrupt record: want an error naming the attachment and %s, got %v", s.Path(k), err)
	}
}

func TestCacheSeesChanges(t *testing.T) {
	s := New(t.TempDir())
	c := NewCache(s)
	r := &Record{Network: "n", ContainerID: "a", IfName: "eth0", HostVeth: "v1"}
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	recs, _, err := c.List()
	if err != nil || len(recs) != 1 || recs[0].HostVeth != "v1" {
		t.Fatalf("first list: %v %v", recs, err)
	}
	first := recs[0]
	again, _, _ := c.List()
	if again[0] != first {
		t.Error("an unchanged record was decoded again")
	}
	r.HostVeth = "v2"
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	recs, _, _ = c.List()
	if recs[0].HostVeth != "v2" {
		t.Errorf("changed record not re-read: %+v", recs[0])
	}
	if err := s.Delete(r.Key()); err != nil {
		t.Fatal(err)
	}
	if recs, _, _ := c.List(); len(recs) != 0 {
		t.Errorf("deleted record still listed")
	}
}

func TestLockTimeout(t *testing.T) {
	s := New(t.TempDir())
	s.LockTimeout = 50 * time.Millisecond
	r := &Record{Network: "n", ContainerID: "c", IfName: "eth0", HostVeth: "v"}
	if err := os.MkdirAll(s.netDir("n"), 0o700); err != nil {
		t.Fatal(err)
	}
	// flock conflicts between open file descriptions, also of one process.
	f, err := os.OpenFile(filepath.Join(s.netDir("n"), ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	// ADD's writes take no lock: a whole-record rename, never beside a DEL
	// of the same attachment.
	if err := s.Save(r); err != nil {
		t.Fatalf("Save with the lock held: %v", err)
	}
	for name, op := range map[string]func() error{
		"Delete": func() error { return s.Delete(r.Key()) },
		"Update": func() error { return s.Update(r.Key(), func(*Record) error { return nil }) },
	} {
		start := time.Now()
		err := op()
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrTryAgainLater {
			t.Fatalf("%s with the lock held: want CNI error 11, got %v", name, err)
		}
		if !strings.Contains(te.Msg, filepath.Join(s.netDir("n"), ".lock")) {
			t.Errorf("%s: message %q does not name the lock file", name, te.Msg)
		}
		if d := time.Since(start); d < 50*time.Millisecond || d > 2*time.Second {
			t.Errorf("%s waited %v for a 50ms bound", name, d)
		}
	}
	if got, _ := s.Load(r.Key()); got == nil {
		t.Fatal("Delete refused at the lock removed the record")
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(r.Key()); err != nil {
		t.Fatalf("Delete after the lock is free: %v", err)
	}
}
