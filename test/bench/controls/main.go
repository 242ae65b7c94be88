// Command controls measures the cost of a pod's packet-rate, connection
// and DSCP controls at a population of P pods that already hold them:
// controls.Manager as the plugin runs it (open, Set or Del, close), for
// one more pod, in one network namespace standing for the node
// (test/bench/controls.sh makes a fresh one per run). It prints one TSV
// line:
//
//	pods cycles setP50 setP90 setP99 delP50 delP90 delP99 rules closeP50
//
// latencies in ms; rules is the number of rules in qoscni's table;
// closeP50 is the part of Del spent closing the socket: Linux waits there
// for the transaction's objects to be freed after an RCU grace period
// whenever one was removed (nf_tables flushes its destroy work when an
// nfnetlink socket is released), and a process exiting pays the same.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/qoscni/qoscni/controls"
	"github.com/qoscni/qoscni/internal/nfraw"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/test/bench/addel"
)

func main() {
	population := flag.Int("population", 1, "pods holding controls while measuring")
	cycles := flag.Int("cycles", 30, "measured Set+Del cycles")
	flag.Parse()
	if err := run(*population, *cycles); err != nil {
		fmt.Fprintln(os.Stderr, "controls bench:", err)
		os.Exit(1)
	}
}

// pod i's addresses, one per family.
func podIPs(i int) []net.IP {
	return []net.IP{net.IPv4(10, 200, byte(i>>8), byte(i&0xff)).To4(), net.ParseIP(fmt.Sprintf("fd20::%x", i))}
}

func owner(i int) controls.Owner {
	return controls.Owner{ContainerID: fmt.Sprintf("bench%06d", i), IfName: "eth0", PodNamespace: "bench", PodName: fmt.Sprintf("pod-%d", i)}
}

// every control a pod can have, in both directions.
func podControls() *state.Controls {
	ef := uint8(46)
	d := &state.ControlDirection{PacketRate: 10_000, PacketBurst: 100, MaxConnections: 1000}
	return &state.Controls{Ingress: d, Egress: d, DSCP: &ef}
}

func run(population, cycles int) error {
	c := podControls()
	m, err := controls.New(-1)
	if err != nil {
		return err
	}
	for i := 1; i <= population; i++ {
		if err := m.Set(owner(i), podIPs(i), c); err != nil {
			m.Close()
			return fmt.Errorf("populate pod %d: %w", i, err)
		}
	}
	m.Close()
	// The measured pod is a new one each cycle, as each ADD is.
	var sets, dels, closes []time.Duration
	for k := range cycles {
		i := population + 1 + k
		start := time.Now()
		m, err := controls.New(-1)
		if err != nil {
			return err
		}
		err = m.Set(owner(i), podIPs(i), c)
		m.Close()
		if err != nil {
			return err
		}
		sets = append(sets, time.Since(start))
		start = time.Now()
		if m, err = controls.New(-1); err != nil {
			return err
		}
		err = m.Del(owner(i), podIPs(i))
		closing := time.Now()
		m.Close()
		if err != nil {
			return err
		}
		dels = append(dels, time.Since(start))
		closes = append(closes, time.Since(closing))
	}
	rules, err := ruleCount()
	if err != nil {
		return err
	}
	s, d := addel.Summarize(sets), addel.Summarize(dels)
	ms := func(v time.Duration) string { return fmt.Sprintf("%.3f", float64(v)/1e6) }
	fmt.Printf("%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", population, cycles, ms(s.P50), ms(s.P90), ms(s.P99), ms(d.P50), ms(d.P90), ms(d.P99), rules,
		ms(addel.Summarize(closes).P50))
	return nil
}

func ruleCount() (int, error) {
	raw, err := nfraw.Dial(-1)
	if err != nil {
		return 0, err
	}
	defer raw.Close()
	have, err := raw.RuleComments("qoscni")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range have {
		n += len(r)
	}
	return n, nil
}
