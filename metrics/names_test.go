package metrics

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qoscni/qoscni/internal/journal"
)

// Names lists one family per descriptor Describe sends, and every family
// a scrape exports is among them.
func TestNamesMatchDescribeAndGather(t *testing.T) {
	dir := t.TempDir()
	jdir := filepath.Join(dir, "journal")
	if err := journal.Append(jdir, journal.Record{Time: time.Now(), Command: "ADD", Network: "n", Duration: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	c := NewCollector(Config{StateDir: filepath.Join(dir, "state"), JournalDir: jdir})

	families := map[string]bool{}
	for _, n := range c.Names() {
		for _, s := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(n, s); ok && base == nameOpDuration {
				n = base
			}
		}
		families[n] = true
	}
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	described := 0
	for range ch {
		described++
	}
	if described != len(families) {
		t.Errorf("Describe sends %d descriptors, Names has %d families", described, len(families))
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	got, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) == 0 {
		t.Fatal("nothing gathered")
	}
	for _, mf := range got {
		if !families[mf.GetName()] {
			t.Errorf("scrape exports %s, which Names does not list", mf.GetName())
		}
	}
}
