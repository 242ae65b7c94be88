// Command agent measures the node agent: scrape latency of /metrics and the
// agent's resident memory with 1, 100 and 500 shaped pods. Each pod is what
// the plugin builds for a pod shaped both ways (host veth with a root TBF, an
// ingress qdisc with a u32+mirred redirect, an IFB with a root TBF) plus its
// state record, inside a fresh node namespace. The agent runs as its own
// process, as deployed, reading that namespace. Needs root; run via
// test/bench/agent.sh.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/qoscni/qoscni/internal/state"
)

func main() {
	agentBin := flag.String("agent", "bin/qoscni-agent", "agent binary")
	pops := flag.String("pods", "1,100,500", "populations")
	scrapes := flag.Int("scrapes", 50, "timed scrapes per population")
	flag.Parse()
	fmt.Println("| shaped pods | series | scrape p50 | scrape p99 | scrape max | collect (agent) | agent RSS | agent peak RSS |")
	fmt.Println("|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, p := range strings.Split(*pops, ",") {
		n, err := strconv.Atoi(p)
		if err != nil {
			fail(err)
		}
		if err := run(*agentBin, n, *scrapes); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "test/bench/agent:", err)
	os.Exit(1)
}

func sh(stdin string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %v\n%s", name, args, err, out)
	}
	return nil
}

func run(agentBin string, n, scrapes int) error {
	ns := fmt.Sprintf("qab-%d-%d", os.Getpid(), n)
	if err := sh("", "ip", "netns", "add", ns); err != nil {
		return err
	}
	defer exec.Command("ip", "netns", "del", ns).Run()
	dir, err := os.MkdirTemp("", "qoscni-bench-agent-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	var ipb, tcb bytes.Buffer
	store := state.New(filepath.Join(dir, "state"))
	for i := 0; i < n; i++ {
		h, p, ifb := fmt.Sprintf("bh%d", i), fmt.Sprintf("bp%d", i), fmt.Sprintf("bi%d", i)
		fmt.Fprintf(&ipb, "link add %s type veth peer name %s\nlink set %s up\nlink set %s up\nlink add %s type ifb\nlink set %s up\n", h, p, h, p, ifb, ifb)
		fmt.Fprintf(&tcb, "qdisc add dev %s root handle 1: tbf rate 10mbit burst 12500 limit 125000\n", h)
		fmt.Fprintf(&tcb, "qdisc add dev %s handle ffff: ingress\n", h)
		fmt.Fprintf(&tcb, "filter add dev %s parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev %s\n", h, ifb)
		fmt.Fprintf(&tcb, "qdisc add dev %s root handle 1: tbf rate 5mbit burst 12500 limit 62500\n", ifb)
		r := &state.Record{Network: "bench", ContainerID: fmt.Sprintf("%064x", i), IfName: "eth0",
			Pod: state.Pod{Namespace: fmt.Sprintf("ns%d", i%20), Name: fmt.Sprintf("pod-%d", i)}, Mode: state.ModeStandalone,
			HostVeth: h, Created: time.Now(),
			Shaping: &state.Shaping{IFB: ifb,
				Ingress: &state.Direction{Device: h, RateBits: 10e6, BurstBits: 100000, LimitBytes: 125000, MaxQueueDelayNs: 100e6},
				Egress:  &state.Direction{Device: ifb, RateBits: 5e6, BurstBits: 100000, LimitBytes: 62500, MaxQueueDelayNs: 100e6}},
			Ports: []state.Port{{HostPort: 20000 + i, ContainerPort: 80, Protocol: "tcp"}}}
		if err := store.Save(r); err != nil {
			return err
		}
	}
	if err := sh(ipb.String(), "ip", "-n", ns, "-batch", "-"); err != nil {
		return err
	}
	if err := sh(tcb.String(), "tc", "-n", ns, "-batch", "-"); err != nil {
		return err
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(agentBin, "--listen", addr, "--netns", "/run/netns/"+ns, "--state-dir", filepath.Join(dir, "state"),
		"--journal-dir", filepath.Join(dir, "journal"), "--cni-conf-dir", filepath.Join(dir, "net.d"),
		"--state-registry", filepath.Join(dir, "statedirs"), "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }() // by PID

	get := func() (time.Duration, []byte, error) {
		t0 := time.Now()
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return 0, nil, err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return 0, nil, fmt.Errorf("/metrics: %s", resp.Status)
		}
		return time.Since(t0), body, err
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, _, err := get(); err == nil {
			break
		} else if time.Now().After(deadline) {
			return err
		}
	}
	var lat []time.Duration
	var body []byte
	for i := 0; i < scrapes; i++ {
		d, b, err := get()
		if err != nil {
			return err
		}
		lat = append(lat, d)
		body = b
	}
	slices.Sort(lat)
	series := 0
	collect := ""
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, "qoscni_shaping_") {
			series++
		}
		if strings.HasPrefix(line, "qoscni_agent_collect_duration_seconds ") {
			v, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
			collect = ms(time.Duration(v * float64(time.Second)))
		}
	}
	rss, hwm := procStatus(cmd.Process.Pid, "VmRSS:"), procStatus(cmd.Process.Pid, "VmHWM:")
	fmt.Printf("| %d | %d | %s | %s | %s | %s | %s | %s |\n", n, series, ms(lat[len(lat)/2]), ms(lat[(len(lat)*99-1)/100]), ms(lat[len(lat)-1]), collect, rss, hwm)
	return nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

func procStatus(pid int, key string) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, key) {
			f := strings.Fields(line)
			kb, _ := strconv.Atoi(f[1])
			return fmt.Sprintf("%.1f MiB", float64(kb)/1024)
		}
	}
	return "?"
}
