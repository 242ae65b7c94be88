package ipam

import (
	"fmt"
	"os"
	"testing"
)

// BenchmarkAllocateRelease measures one pod's ADD+DEL against a store that already holds
// 500 reservations, on the test temp dir and, where present, on tmpfs (/dev/shm).
func BenchmarkAllocateRelease(b *testing.B) {
	dirs := map[string]string{"tempdir": b.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "qoscni-ipam-bench-")
		if err == nil {
			b.Cleanup(func() { os.RemoveAll(d) })
			dirs["tmpfs"] = d
		}
	}
	for _, name := range []string{"tmpfs", "tempdir"} {
		dir, ok := dirs[name]
		if !ok {
			continue
		}
		for _, dual := range []bool{false, true} {
			sets := []string{"10.22.0.0/16"}
			label := name + "/ipv4"
			if dual {
				sets = append(sets, "fd00::/64")
				label = name + "/dual"
			}
			b.Run(label, func(b *testing.B) {
				sub, err := os.MkdirTemp(dir, "s")
				if err != nil {
					b.Fatal(err)
				}
				a := newTestAllocator(b, sub, sets...)
				for i := range 500 {
					mustAllocate(b, a, fmt.Sprint("existing-", i), "eth0")
				}
				i := 0
				for b.Loop() {
					id := fmt.Sprint("pod-", i)
					i++
					if _, err := a.Allocate(id, "eth0"); err != nil {
						b.Fatal(err)
					}
					if err := a.Release(id, "eth0"); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkAllocate measures ADD alone (reservations accumulate beyond the first 500).
func BenchmarkAllocate(b *testing.B) {
	d, err := os.MkdirTemp("/dev/shm", "qoscni-ipam-bench-")
	if err != nil {
		d = b.TempDir()
	} else {
		b.Cleanup(func() { os.RemoveAll(d) })
	}
	a := newTestAllocator(b, d, "10.0.0.0/8")
	for i := range 500 {
		mustAllocate(b, a, fmt.Sprint("existing-", i), "eth0")
	}
	i := 0
	for b.Loop() {
		if _, err := a.Allocate(fmt.Sprint("pod-", i), "eth0"); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
