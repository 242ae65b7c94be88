package teardown

import (
	"errors"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/ipam"
)

// These cases touch no kernel: the steps that would (Devices, Shaping,
// Masq) are left out of the orders, and the kernel steps' gate is shown
// with a Cleaner, which is one too.

type fakeIPAM struct {
	held     []net.IP
	owners   map[string]ipam.Attachment
	released []string
	// onRelease sees the store at the moment of the release.
	onRelease func()
}

func (f *fakeIPAM) Get(cid, ifn string) ([]net.IP, error) { return f.held, nil }

func (f *fakeIPAM) Release(cid, ifn string) error {
	if f.onRelease != nil {
		f.onRelease()
	}
	f.released = append(f.released, cid+"/"+ifn)
	return nil
}

func (f *fakeIPAM) Owner(ip net.IP) (ipam.Attachment, bool) {
	o, ok := f.owners[ip.String()]
	return o, ok
}

type fakeCleaner struct {
	err  error
	seen []*state.Record
}

func (c *fakeCleaner) Name() string { return "fake" }

func (c *fakeCleaner) Del(rec *state.Record) error {
	c.seen = append(c.seen, rec)
	return c.err
}

func saved(t *testing.T) (*state.Store, *state.Record) {
	t.Helper()
	store := state.New(t.TempDir())
	rec := &state.Record{Network: "net", ContainerID: "c1", IfName: "eth0", Mode: state.ModeStandalone,
		IPs: []string{"10.0.0.2/24"}, Created: time.Unix(1, 0).UTC()}
	if err := store.Save(rec); err != nil {
		t.Fatal(err)
	}
	return store, rec
}

func recordExists(t *testing.T, store *state.Store, k state.Key) bool {
	t.Helper()
	rec, err := store.Load(k)
	if err != nil {
		t.Fatal(err)
	}
	return rec != nil
}

// The two orders of the callers: which of record and addresses goes first
// is the order they are given in, and each step that ran is marked.
func TestOrder(t *testing.T) {
	for _, c := range []struct {
		name            string
		order           []Step
		recordAtRelease bool
	}{
		{"addresses last (DEL)", []Step{Ports, Record, Addresses}, false},
		{"record last (agent GC)", []Step{Ports, Addresses, Record}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			store, rec := saved(t)
			ip := &fakeIPAM{}
			var atRelease bool
			ip.onRelease = func() { atRelease = recordExists(t, store, rec.Key()) }
			var marks []Step
			err := Run(rec.Key(), rec, Options{Order: c.order, Store: store, IPAM: ip, Cleaners: []Cleaner{&fakeCleaner{}},
				Mark: func(s Step, _ time.Duration) { marks = append(marks, s) }})
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(marks, c.order) {
				t.Errorf("marked %v, want %v", marks, c.order)
			}
			if atRelease != c.recordAtRelease {
				t.Errorf("record present at release: %v, want %v", atRelease, c.recordAtRelease)
			}
			if recordExists(t, store, rec.Key()) || len(ip.released) != 1 {
				t.Errorf("record left or addresses not released (%v)", ip.released)
			}
		})
	}
}

// A failed kernel step is still marked, the steps after it still run, and
// the record and the addresses stay for a retry.
func TestFailedStepKeepsRecord(t *testing.T) {
	store, rec := saved(t)
	ip := &fakeIPAM{}
	bad, good := &fakeCleaner{err: errors.New("boom")}, &fakeCleaner{}
	var marks []Step
	err := Run(rec.Key(), rec, Options{Order: []Step{Ports, Addresses, Record}, Store: store, IPAM: ip,
		Cleaners: []Cleaner{bad, good}, Mark: func(s Step, _ time.Duration) { marks = append(marks, s) }})
	if err == nil || !errors.Is(err, bad.err) {
		t.Fatalf("err = %v, want the cleaner's", err)
	}
	if len(good.seen) != 1 {
		t.Error("the cleaner after the failed one did not run")
	}
	if !reflect.DeepEqual(marks, []Step{Ports}) {
		t.Errorf("marked %v, want [ports]", marks)
	}
	if !recordExists(t, store, rec.Key()) || len(ip.released) != 0 {
		t.Errorf("record gone or addresses released (%v) after a failed step", ip.released)
	}
}

// Without a record the cleaners get a provisional stand-in (hostPorts go
// by owner), and the addresses are those the IPAM holds.
func TestNoRecord(t *testing.T) {
	store := state.New(t.TempDir())
	k := state.Key{Network: "net", ContainerID: "c2", IfName: "eth1"}
	held := []net.IP{net.ParseIP("10.0.0.9")}
	ip := &fakeIPAM{held: held}
	cl := &fakeCleaner{}
	if err := Run(k, nil, Options{Order: []Step{Ports, Record, Addresses}, Store: store, IPAM: ip, Cleaners: []Cleaner{cl}}); err != nil {
		t.Fatal(err)
	}
	if len(cl.seen) != 1 || !cl.seen[0].Provisional || cl.seen[0].Key() != k {
		t.Errorf("cleaner saw %+v, want a provisional record of %v", cl.seen, k)
	}
	got, err := (&run{key: k, rec: cl.seen[0], o: Options{IPAM: ip}}).addrs()
	if err != nil || !reflect.DeepEqual(got, held) {
		t.Errorf("addresses %v, %v; want %v", got, err, held)
	}
}

// The addresses whose masquerade goes: the record's, less (with
// SpareReassigned) those the IPAM now gives to another attachment.
func TestMasqAddrs(t *testing.T) {
	rec := &state.Record{Network: "net", ContainerID: "c1", IfName: "eth0", IPs: []string{"10.0.0.2/24", "10.0.0.3/24", "fd00::2/64"}}
	ip := &fakeIPAM{owners: map[string]ipam.Attachment{
		"10.0.0.2": {ContainerID: "c1", IfName: "eth0"},
		"10.0.0.3": {ContainerID: "other", IfName: "eth0"},
	}}
	for _, c := range []struct {
		spare bool
		want  []string
	}{
		{false, []string{"10.0.0.2", "10.0.0.3", "fd00::2"}},
		{true, []string{"10.0.0.2", "fd00::2"}},
	} {
		got, err := (&run{key: rec.Key(), rec: rec, o: Options{IPAM: ip, SpareReassigned: c.spare}}).addrs()
		if err != nil {
			t.Fatal(err)
		}
		var s []string
		for _, a := range got {
			s = append(s, a.String())
		}
		if !reflect.DeepEqual(s, c.want) {
			t.Errorf("spare %v: %v, want %v", c.spare, s, c.want)
		}
	}
}

// A chained attachment's addresses are the main plugin's.
func TestChainedKeepsAddresses(t *testing.T) {
	store, rec := saved(t)
	rec.Mode = state.ModeChained
	ip := &fakeIPAM{}
	if err := Run(rec.Key(), rec, Options{Order: []Step{Record, Addresses}, Store: store, IPAM: ip}); err != nil {
		t.Fatal(err)
	}
	if len(ip.released) != 0 {
		t.Errorf("released %v of a chained attachment", ip.released)
	}
}

// meetCleaner returns only once its partner has started too, or fails
// after a second: two of them pass only when they run at once.
type meetCleaner struct {
	here, there chan struct{}
}

func (c *meetCleaner) Name() string { return "meet" }

func (c *meetCleaner) Del(*state.Record) error {
	close(c.here)
	select {
	case <-c.there:
		return nil
	case <-time.After(time.Second):
		return errors.New("ran alone")
	}
}

// Concurrent: the kernel steps' work runs at once (here two cleaners that
// each wait for the other), every step is marked, and the durable steps
// still run after them, in order.
func TestConcurrentKernelSteps(t *testing.T) {
	store, rec := saved(t)
	ip := &fakeIPAM{}
	ip.onRelease = func() {
		if recordExists(t, store, rec.Key()) {
			t.Error("addresses released before the record went")
		}
	}
	a, b := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	var marks []Step
	err := Run(rec.Key(), rec, Options{Order: []Step{Ports, Record, Addresses}, Store: store, IPAM: ip, Concurrent: true,
		Cleaners: []Cleaner{&meetCleaner{a, b}, &meetCleaner{b, a}},
		Mark:     func(s Step, _ time.Duration) { mu.Lock(); marks = append(marks, s); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(marks, []Step{Ports, Record, Addresses}) {
		t.Errorf("marked %v", marks)
	}
	if recordExists(t, store, rec.Key()) || len(ip.released) != 1 {
		t.Errorf("record left or addresses not released (%v)", ip.released)
	}
	// Without Concurrent the same cleaners run one after the other.
	store, rec = saved(t)
	a, b = make(chan struct{}), make(chan struct{})
	err = Run(rec.Key(), rec, Options{Order: []Step{Ports, Record}, Store: store,
		Cleaners: []Cleaner{&meetCleaner{a, b}, &meetCleaner{b, a}}})
	if err == nil || !strings.Contains(err.Error(), "ran alone") || !recordExists(t, store, rec.Key()) {
		t.Errorf("sequential: %v (record kept: %v)", err, recordExists(t, store, rec.Key()))
	}
}

// queuer is a Cleaner that queues (nothing: the batch stays empty, so the
// transaction sends nothing) and says whether it handled the record.
type queuer struct {
	fakeCleaner
	handled       bool
	queued, after int
}

func (q *queuer) Queue(rec *state.Record, _ *nfraw.Conn, _ *nfraw.Batch) (func() error, bool, error) {
	q.queued++
	if !q.handled {
		return nil, false, nil
	}
	return func() error { q.after++; return nil }, true, nil
}

// OneTransaction: a Queuer that handles the record queues and its after
// runs once the transaction went, without its Del; one that does not
// handle it, and a plain Cleaner, run Del; the step is marked once.
func TestOneTransaction(t *testing.T) {
	store, rec := saved(t)
	yes, no, plain := &queuer{handled: true}, &queuer{}, &fakeCleaner{}
	var marks []Step
	var mu sync.Mutex
	err := Run(rec.Key(), rec, Options{Order: []Step{Ports, Record}, Store: store, Concurrent: true, OneTransaction: true,
		Cleaners: []Cleaner{yes, no, plain},
		Mark:     func(s Step, _ time.Duration) { mu.Lock(); marks = append(marks, s); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	if yes.queued != 1 || yes.after != 1 || len(yes.seen) != 0 {
		t.Errorf("handling queuer: queued %d, after %d, Del %d; want 1, 1, 0", yes.queued, yes.after, len(yes.seen))
	}
	if no.queued != 1 || len(no.seen) != 1 || len(plain.seen) != 1 {
		t.Errorf("not handling queuer: queued %d, Del %d; plain Del %d; want 1, 1, 1", no.queued, len(no.seen), len(plain.seen))
	}
	if !reflect.DeepEqual(marks, []Step{Ports, Record}) || recordExists(t, store, rec.Key()) {
		t.Errorf("marked %v, record kept %v", marks, recordExists(t, store, rec.Key()))
	}
}
