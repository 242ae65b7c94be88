package portmap

import (
	"net"
	"os"
	"testing"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

func TestCleanerTwoPassesAndDel(t *testing.T) {
	n := testnet.NewNode(t)
	f, err := os.Open(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	m, err := New(fd)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	pod := net.ParseIP("10.91.0.2").To4()
	live := Owner{ContainerID: "live", IfName: "eth0"}
	orphan := Owner{ContainerID: "orphan", IfName: "eth0"}
	if err := m.Add(live, "", []Mapping{{HostPort: 7001, ContainerPort: 80, Protocol: "tcp", PodIP: pod}}); err != nil {
		t.Fatal(err)
	}
	other := net.ParseIP("10.91.0.3").To4()
	if err := m.Add(orphan, "", []Mapping{{HostPort: 7002, ContainerPort: 80, Protocol: "tcp", PodIP: other}}); err != nil {
		t.Fatal(err)
	}
	c := NewCleaner(fd)
	recs := []*state.Record{{ContainerID: "live", IfName: "eth0"}}
	if n, err := c.GC(recs); err != nil || n != 0 {
		t.Fatalf("first pass must only note the orphan: %d %v", n, err)
	}
	if n, err := c.GC(recs); err != nil || n == 0 {
		t.Fatalf("second pass must remove the orphan: %d %v", n, err)
	}
	liveMaps := []Mapping{{HostPort: 7001, ContainerPort: 80, Protocol: "tcp", PodIP: pod}}
	if err := m.Check(live, liveMaps); err != nil {
		t.Fatalf("the live attachment lost its mapping: %v", err)
	}
	if err := m.Check(orphan, []Mapping{{HostPort: 7002, ContainerPort: 80, Protocol: "tcp", PodIP: other}}); err == nil {
		t.Fatal("the orphan's mapping survived")
	}
	rec := &state.Record{ContainerID: "live", IfName: "eth0", Ports: ToState([]Mapping{{HostPort: 7001, ContainerPort: 80, Protocol: "tcp", PodIP: pod}})}
	if err := c.Del(rec); err != nil {
		t.Fatal(err)
	}
	if cnt, _ := m.Count(); cnt != 0 {
		t.Fatalf("elements left after Del: %d", cnt)
	}
}
