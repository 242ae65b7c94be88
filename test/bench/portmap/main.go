// Command portmap measures the latency of the hostPort step alone: qoscni's
// portmap.Manager (in process, as the plugin runs it: open, Add or Del,
// close) against the reference portmap plugin (iptables, exec'd with a CNI
// 1.0.0 config carrying prevResult and runtimeConfig.portMappings), at a
// population of P pods that already hold one hostPort each.
//
// It must run as root inside a fresh network namespace standing for the
// node (test/bench/portmap.sh does that). It prints one TSV line per run:
//
//	impl pods cycles addP50 addP90 addP99 delP50 delP90 delP99 rules
//
// latencies in ms; rules is the number of rules in the chains a hostPort
// packet is evaluated against (see countRules).
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"time"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/portmap"
	"github.com/qoscni/qoscni/test/bench/addel"
)

const (
	bridge   = "pmbench0"
	basePort = 20000
)

type options struct {
	impl       string
	population int
	cycles     int
	refPlugin  string
	netnsPath  string
}

func main() {
	var o options
	flag.StringVar(&o.impl, "impl", "qoscni", "qoscni, ref, or exec (cost of exec'ing the reference binary for VERSION)")
	flag.IntVar(&o.population, "population", 1, "pods holding a hostPort while measuring")
	flag.IntVar(&o.cycles, "cycles", 30, "measured ADD+DEL cycles")
	flag.StringVar(&o.refPlugin, "ref", "/usr/lib/cni/portmap", "reference portmap plugin")
	flag.StringVar(&o.netnsPath, "netns", "/proc/self/ns/net", "CNI_NETNS passed to the reference plugin")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "portmap bench:", err)
		os.Exit(1)
	}
}

// podIP gives pod i an address behind the bench bridge.
func podIP(i int) net.IP { return net.IPv4(10, 200, byte(i>>8), byte(i&0xff)).To4() }

func podPort(i int) int { return basePort + i }

type impl interface {
	add(i int) error
	del(i int) error
	rules() (int, error)
}

func run(o options) error {
	if out, err := exec.Command("ip", "link", "add", bridge, "type", "bridge").CombinedOutput(); err != nil {
		return fmt.Errorf("create bridge: %v: %s", err, out)
	}
	defer exec.Command("ip", "link", "del", bridge).Run()
	for _, args := range [][]string{{"addr", "add", "10.200.0.1/16", "dev", bridge}, {"link", "set", bridge, "up"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %v: %v: %s", args, err, out)
		}
	}
	if o.impl == "exec" {
		return execBaseline(o)
	}
	var im impl
	switch o.impl {
	case "qoscni":
		im = &qoscni{}
		defer portmap.Uninstall(-1)
	case "ref":
		im = &ref{o: o}
	default:
		return fmt.Errorf("unknown -impl %q", o.impl)
	}
	// Pods 2..population+1 are the population; pod population+2 is measured.
	for i := 2; i < o.population+2; i++ {
		if err := im.add(i); err != nil {
			return fmt.Errorf("fill pod %d: %w", i, err)
		}
	}
	rules, err := im.rules()
	if err != nil {
		return err
	}
	probe := o.population + 2
	// Untimed warm-up: page cache, CPU frequency, first socket opens.
	for c := 0; c < 3; c++ {
		if err := im.add(probe); err != nil {
			return fmt.Errorf("warm-up ADD: %w", err)
		}
		if err := im.del(probe); err != nil {
			return fmt.Errorf("warm-up DEL: %w", err)
		}
	}
	var adds, dels []time.Duration
	for c := 0; c < o.cycles; c++ {
		t0 := time.Now()
		if err := im.add(probe); err != nil {
			return fmt.Errorf("measured ADD: %w", err)
		}
		t1 := time.Now()
		if err := im.del(probe); err != nil {
			return fmt.Errorf("measured DEL: %w", err)
		}
		adds, dels = append(adds, t1.Sub(t0)), append(dels, time.Since(t1))
	}
	for i := 2; i < o.population+2; i++ {
		if err := im.del(i); err != nil {
			return fmt.Errorf("drain pod %d: %w", i, err)
		}
	}
	a, d := addel.Summarize(adds), addel.Summarize(dels)
	ms := func(x time.Duration) string { return fmt.Sprintf("%.2f", float64(x.Microseconds())/1000) }
	fmt.Printf("%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", o.impl, o.population, o.cycles,
		ms(a.P50), ms(a.P90), ms(a.P99), ms(d.P50), ms(d.P90), ms(d.P99), rules)
	return nil
}

// qoscni runs the portmap step as the plugin does: a fresh Manager per call.
type qoscni struct{}

func (q *qoscni) owner(i int) portmap.Owner {
	return portmap.Owner{ContainerID: fmt.Sprintf("bench%06d", i), IfName: "eth0", PodNamespace: "bench", PodName: fmt.Sprintf("pod-%d", i)}
}

func (q *qoscni) maps(i int) ([]portmap.Mapping, error) {
	ips := []net.IP{podIP(i)}
	ports, err := netconf.ParsePortMappings([]netconf.PortMapping{{HostPort: podPort(i), ContainerPort: 80, Protocol: "tcp"}}, netconf.FamiliesOf(ips))
	if err != nil {
		return nil, err
	}
	return portmap.Plan(ports, ips), nil
}

func (q *qoscni) do(i int, add bool) error {
	maps, err := q.maps(i)
	if err != nil {
		return err
	}
	m, err := portmap.New(-1)
	if err != nil {
		return err
	}
	defer m.Close()
	if add {
		return m.Add(q.owner(i), bridge, maps)
	}
	return m.Del(q.owner(i), maps)
}

func (q *qoscni) add(i int) error { return q.do(i, true) }
func (q *qoscni) del(i int) error { return q.do(i, false) }

var ruleLine = regexp.MustCompile(`^\s+[^\s].* # handle \d+$`)

// rules counts the rules of our chains (nft -a list), all of which a
// hostPort packet may be evaluated against; set and map elements are data.
func (q *qoscni) rules() (int, error) {
	out, err := exec.Command("nft", "-a", "list", "table", "inet", "qoscni").Output()
	if err != nil {
		return 0, fmt.Errorf("nft list: %w", err)
	}
	n := 0
	for _, l := range strings.Split(string(out), "\n") {
		t := strings.TrimSpace(l)
		if ruleLine.MatchString(l) && !strings.HasPrefix(t, "chain ") && !strings.HasPrefix(t, "map ") &&
			!strings.HasPrefix(t, "set ") && !strings.HasPrefix(t, "table ") {
			n++
		}
	}
	return n, nil
}

// ref execs the reference plugin.
type ref struct{ o options }

func (r *ref) conf(i int) []byte {
	c := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "refnet",
		"type":       "portmap",
		"snat":       true,
		"runtimeConfig": map[string]any{
			"portMappings": []map[string]any{{"hostPort": podPort(i), "containerPort": 80, "protocol": "tcp"}},
		},
		"prevResult": map[string]any{
			"cniVersion": "1.0.0",
			"interfaces": []map[string]any{{"name": "eth0", "sandbox": r.o.netnsPath}},
			"ips":        []map[string]any{{"address": podIP(i).String() + "/16", "interface": 0, "gateway": "10.200.0.1"}},
		},
	}
	b, _ := json.Marshal(c)
	return b
}

func (r *ref) call(cmd string, i int) error {
	c := exec.Command(r.o.refPlugin)
	c.Env = []string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=" + cmd, "CNI_CONTAINERID=" + fmt.Sprintf("bench%06d", i),
		"CNI_NETNS=" + r.o.netnsPath, "CNI_IFNAME=eth0", "CNI_PATH=/usr/lib/cni"}
	c.Stdin = bytes.NewReader(r.conf(i))
	out, err := c.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", r.o.refPlugin, cmd, err, out)
	}
	return nil
}

func (r *ref) add(i int) error { return r.call("ADD", i) }
func (r *ref) del(i int) error { return r.call("DEL", i) }

// rules counts what a packet to a hostPort walks in the reference layout:
// PREROUTING's jump, every rule of CNI-HOSTPORT-DNAT (one per container,
// evaluated in order), and the matched container's CNI-DN-* chain.
func (r *ref) rules() (int, error) {
	out, err := exec.Command("iptables", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT").Output()
	if err != nil {
		return 0, fmt.Errorf("iptables -S: %w", err)
	}
	n := 0
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	// + the PREROUTING jump + the DNAT chain of the matched container
	// (its rules: hairpin mark, localhost mark, dnat = 3 for one mapping).
	return n + 1 + 3, nil
}

// execBaseline is the cost of exec'ing the reference binary at all.
func execBaseline(o options) error {
	var d []time.Duration
	for c := 0; c < o.cycles; c++ {
		cmd := exec.Command(o.refPlugin)
		cmd.Env = []string{"CNI_COMMAND=VERSION"}
		cmd.Stdin = strings.NewReader(`{"cniVersion":"1.0.0"}`)
		t0 := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("exec VERSION: %v: %s", err, out)
		}
		d = append(d, time.Since(t0))
	}
	s := addel.Summarize(d)
	ms := func(x time.Duration) string { return fmt.Sprintf("%.2f", float64(x.Microseconds())/1000) }
	fmt.Printf("exec\t0\t%d\t%s\t%s\t%s\t-\t-\t-\t-\n", o.cycles, ms(s.P50), ms(s.P90), ms(s.P99))
	return nil
}
