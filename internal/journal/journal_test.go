package journal

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

func TestDirFor(t *testing.T) {
	for in, want := range map[string]string{
		"/var/lib/cni/qoscni/state": DefaultDir,
		"/tmp/x/state/":             "/tmp/x/journal",
		"":                          DefaultDir,
		"relative/state":            DefaultDir,
	} {
		if got := DirFor(in); got != want {
			t.Errorf("DirFor(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestAppendDrainRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	now := time.Unix(1700000000, 123)
	in := []Record{
		{Time: now, Command: "ADD", Network: "qoscni", Code: 0, Duration: 1500 * time.Microsecond},
		{Time: now, Command: "DEL", Network: "odd\tname\n", Code: 7, Duration: time.Millisecond},
	}
	for _, r := range in {
		if err := Append(dir, r); err != nil {
			t.Fatal(err)
		}
	}
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %v, %v; want 0700", st.Mode(), err)
	}
	st, err = os.Stat(filepath.Join(dir, liveName))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("file mode %v, %v; want 0600", st.Mode(), err)
	}
	got, bad, err := Drain(dir)
	if err != nil || bad != 0 || len(got) != 2 {
		t.Fatalf("Drain = %v, %d, %v", got, bad, err)
	}
	if !got[0].Time.Equal(now) || got[0].Command != "ADD" || got[0].Duration != 1500*time.Microsecond || !got[0].OK() {
		t.Errorf("record 0 = %+v", got[0])
	}
	if got[1].Network != "odd_name_" || got[1].Code != 7 {
		t.Errorf("record 1 = %+v", got[1])
	}
	if got, _, _ := Drain(dir); len(got) != 0 {
		t.Errorf("second Drain returned %d records", len(got))
	}
}

func TestDrainReadsLeftoverAndSkipsTornLine(t *testing.T) {
	dir := t.TempDir()
	r := Record{Time: time.Now(), Command: "ADD", Network: "n"}
	left := appendLine(nil, r)
	if err := os.WriteFile(filepath.Join(dir, drainingName), append(left, "1\t12"...), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Append(dir, r); err != nil {
		t.Fatal(err)
	}
	got, bad, err := Drain(dir)
	if err != nil || len(got) != 2 || bad != 1 {
		t.Fatalf("Drain = %d records, %d bad, %v; want 2, 1, nil", len(got), bad, err)
	}
}

// Appenders racing a draining loop: every record is drained exactly once.
func TestConcurrentAppendDuringDrain(t *testing.T) {
	dir := t.TempDir()
	const writers, each = 8, 400
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if err := Append(dir, Record{Time: time.Now(), Command: "ADD", Network: "n"}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	total, drains := 0, 0
	for {
		select {
		case <-done:
			recs, bad, err := Drain(dir)
			if err != nil || bad != 0 {
				t.Fatalf("final drain: %d bad, %v", bad, err)
			}
			total += len(recs)
			if total != writers*each {
				t.Fatalf("drained %d records over %d drains, want %d", total, drains, writers*each)
			}
			t.Logf("%d records over %d drains", total, drains+1)
			return
		default:
			recs, bad, err := Drain(dir)
			if err != nil || bad != 0 {
				t.Fatalf("drain: %d bad, %v", bad, err)
			}
			total += len(recs)
			drains++
		}
	}
}

func TestWrapRecordsOutcome(t *testing.T) {
	root := t.TempDir()
	// The network as the plugin's parse of stdin reports it.
	net1 := Network{Name: "net1", StateDir: filepath.Join(root, "state")}
	funcs := Wrap(Funcs{
		Add: func(*skel.CmdArgs) (Network, error) { return net1, nil },
		Del: func(*skel.CmdArgs) (Network, error) { return net1, types.NewError(types.ErrTryAgainLater, "busy", "") },
		GC:  func(*skel.CmdArgs) (Network, error) { return net1, errors.New("plain") },
	})
	if funcs.Check != nil {
		t.Fatal("nil func must stay nil")
	}
	args := &skel.CmdArgs{}
	_ = funcs.Add(args)
	if err := funcs.Del(args); err == nil {
		t.Fatal("Del error lost")
	}
	_ = funcs.GC(args)
	got, _, err := Drain(filepath.Join(root, "journal"))
	if err != nil || len(got) != 3 {
		t.Fatalf("Drain = %v, %v", got, err)
	}
	want := []struct {
		cmd  string
		code int
	}{{"ADD", 0}, {"DEL", int(types.ErrTryAgainLater)}, {"GC", ResultOther}}
	for i, w := range want {
		if got[i].Command != w.cmd || got[i].Code != w.code || got[i].Network != "net1" {
			t.Errorf("record %d = %+v, want %s code %d", i, got[i], w.cmd, w.code)
		}
	}
}

// BenchmarkRecordCall is the plugin's per-call cost: open, lock, check,
// write, close (the network comes from the plugin's own parse of stdin).
func BenchmarkRecordCall(b *testing.B) {
	root := b.TempDir()
	n := Network{Name: "qoscni", StateDir: filepath.Join(root, "state")}
	start := time.Now()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := RecordCall(n, "ADD", start, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if _, _, err := Drain(filepath.Join(root, "journal")); err != nil {
		b.Fatal(err)
	}
}
