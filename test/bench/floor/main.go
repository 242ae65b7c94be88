// Command floor measures what any CNI plugin pays on this machine before
// its own work: starting a process, removing a network device, a durable
// write. test/bench/floor.sh builds and runs it; docs/benchmarks.md quotes
// it as the floor under ADD and DEL.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

type row struct {
	what    string
	samples []time.Duration
}

func (r row) pct(q float64) time.Duration {
	s := slices.Clone(r.samples)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.999999) - 1 // nearest rank
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }

func main() {
	n := flag.Int("n", 40, "samples per row")
	empty := flag.String("empty", "", "an empty static Go binary")
	plugin := flag.String("plugin", "", "the qoscni plugin binary (timed with CNI_COMMAND=VERSION)")
	dir := flag.String("dir", "/var/lib/cni", "directory of the durable writes (the state dir's filesystem)")
	flag.Parse()

	var rows []row
	add := func(what string, f func() (time.Duration, error)) {
		r := row{what: what}
		for i := 0; i < *n; i++ {
			d, err := f()
			if err != nil {
				fmt.Fprintf(os.Stderr, "floor: %s: %v\n", what, err)
				os.Exit(1)
			}
			r.samples = append(r.samples, d)
		}
		rows = append(rows, r)
	}
	add("exec to exit: /bin/true", func() (time.Duration, error) { return execTime(nil, "/bin/true") })
	if *empty != "" {
		add("exec to exit: empty static Go binary", func() (time.Duration, error) { return execTime(nil, *empty) })
	}
	if *plugin != "" {
		stdin := []byte(`{"cniVersion":"1.1.0"}`)
		add("exec to exit: qoscni VERSION", func() (time.Duration, error) { return execTime(stdin, *plugin, "CNI_COMMAND=VERSION") })
	}
	if err := inNetns(func() {
		add("delete one veth pair", func() (time.Duration, error) { return deleteLinks(veth("flv")) })
		add("delete one IFB", func() (time.Duration, error) { return deleteLinks(ifb("fli")) })
		add("delete a veth pair, then an IFB", func() (time.Duration, error) { return deleteLinks(veth("flv"), ifb("fli")) })
		add("delete a veth pair and an IFB at once (two sockets)", func() (time.Duration, error) { return deleteConcurrently(veth("flv"), ifb("fli")) })
		add("delete a veth pair and an IFB in one request (a device group)", func() (time.Duration, error) { return deleteGroup(veth("flv"), ifb("fli")) })
		add("delete a veth pair on a bridge, with a TBF root", func() (time.Duration, error) { return deleteLinks(bridged("flb")) })
		add("nftables: remove a set element (one transaction, socket closed)", func() (time.Duration, error) { return nftRemove(1) })
		add("nftables: remove two set elements in two transactions", func() (time.Duration, error) { return nftRemove(2) })
		add("nftables: open, read the table, close", func() (time.Duration, error) { return nftRemove(0) })
		for _, o := range []nftOrder{closeFirst, atOnce, closeLast} {
			add("nftables removal and a veth pair and IFB in one request: "+o.String(), func() (time.Duration, error) {
				return nftAndDevices(o, veth("flv"), ifb("fli"))
			})
		}
	}); err != nil {
		fmt.Fprintln(os.Stderr, "floor:", err)
		os.Exit(1)
	}
	add("durable write (write, fsync, rename, fsync dir) in "+*dir, func() (time.Duration, error) { return durableWrite(*dir) })

	fmt.Printf("Floor on this machine: %d samples per row, %d CPUs, %s. Times in ms.\n\n", *n, runtime.NumCPU(), kernel())
	fmt.Println("| what | p50 | p90 | min |")
	fmt.Println("|------|----:|----:|----:|")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %s | %s |\n", r.what, ms(r.pct(0.5)), ms(r.pct(0.9)), ms(r.pct(0)))
	}
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return "kernel " + string(bytes.TrimSpace(b))
}

// execTime is fork, exec and wait of one command, as a runtime runs a
// plugin (stdin given, output read).
func execTime(stdin []byte, path string, env ...string) (time.Duration, error) {
	cmd := exec.Command(path)
	cmd.Env = append([]string{"PATH=/usr/bin:/bin"}, env...)
	cmd.Stdin = bytes.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	start := time.Now()
	err := cmd.Run()
	return time.Since(start), err
}

// inNetns runs f on a locked thread in a new network namespace, removed
// afterwards.
func inNetns(f func()) error {
	runtime.LockOSThread() // unlocked only once back: a thread left elsewhere dies with the tool
	orig, err := netns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	ns, err := netns.New() // unshare: this thread moves into it
	if err != nil {
		return err
	}
	defer ns.Close()
	defer func() {
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
	}()
	f()
	return nil
}

func veth(name string) func() (netlink.Link, error) {
	return func() (netlink.Link, error) {
		l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
		return l, netlink.LinkAdd(l)
	}
}

func ifb(name string) func() (netlink.Link, error) {
	return func() (netlink.Link, error) {
		l := &netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Name: name}}
		return l, netlink.LinkAdd(l)
	}
}

// deleteLinks makes the devices, brings them up, then times deleting
// them one after the other.
func deleteLinks(makers ...func() (netlink.Link, error)) (time.Duration, error) {
	links, err := makeUp(makers)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	for _, l := range links {
		if err := netlink.LinkDel(l); err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}

// deleteConcurrently times deleting the devices each from its own netlink
// socket at once: whether their grace periods overlap.
func deleteConcurrently(makers ...func() (netlink.Link, error)) (time.Duration, error) {
	links, err := makeUp(makers)
	if err != nil {
		return 0, err
	}
	ns, err := netns.Get()
	if err != nil {
		return 0, err
	}
	defer ns.Close()
	handles := make([]*netlink.Handle, len(links))
	for i := range links {
		if handles[i], err = netlink.NewHandleAt(ns); err != nil {
			return 0, err
		}
		defer handles[i].Close()
	}
	errs := make([]error, len(links))
	var wg sync.WaitGroup
	start := time.Now()
	for i, l := range links {
		wg.Go(func() { errs[i] = handles[i].LinkDel(l) })
	}
	wg.Wait()
	d := time.Since(start)
	for _, err := range errs {
		if err != nil {
			return 0, err
		}
	}
	return d, nil
}

// deleteGroup puts the devices in one device group and times deleting the
// group in one RTM_DELLINK: the kernel unregisters them together.
func deleteGroup(makers ...func() (netlink.Link, error)) (time.Duration, error) {
	links, err := makeUp(makers)
	if err != nil {
		return 0, err
	}
	const group = 0x51c0
	for _, l := range links {
		if err := netlink.LinkSetGroup(l, group); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_GROUP, nl.Uint32Attr(group)))
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// bridged makes a veth pair whose first end is a port of bridge flbr
// (made once) with a TBF root qdisc, as a pod's host veth is.
func bridged(name string) func() (netlink.Link, error) {
	return func() (netlink.Link, error) {
		br, err := netlink.LinkByName("flbr")
		if err != nil {
			br = &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "flbr"}}
			if err := netlink.LinkAdd(br); err != nil {
				return nil, err
			}
			if err := netlink.LinkSetUp(br); err != nil {
				return nil, err
			}
		}
		l, err := veth(name)()
		if err != nil {
			return nil, err
		}
		if err := netlink.LinkSetMaster(l, br); err != nil {
			return nil, err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return nil, err
		}
		tbf := &netlink.Tbf{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT},
			Rate: 100e6 / 8, Limit: 125000, Buffer: 125000}
		return l, netlink.QdiscAdd(tbf)
	}
}

// nftRemove adds n elements to a set of table inet qoscni-floor (made
// once), then times removing them, each in its own transaction on its own
// socket, closed: the wait for a grace period that follows a transaction
// removing objects. n = 0 times a socket that only reads.
func nftRemove(n int) (time.Duration, error) {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: "qoscni-floor"}
	set := &nftables.Set{Table: t, Name: "s", KeyType: nftables.TypeIPAddr}
	c, err := nftables.New()
	if err != nil {
		return 0, err
	}
	c.AddTable(t)
	if err := c.AddSet(set, nil); err != nil {
		return 0, err
	}
	for i := range n {
		if err := c.SetAddElements(set, []nftables.SetElement{{Key: []byte{10, 0, 0, byte(i + 1)}}}); err != nil {
			return 0, err
		}
	}
	if err := c.Flush(); err != nil {
		return 0, err
	}
	if err := c.CloseLasting(); err != nil {
		return 0, err
	}
	start := time.Now()
	if n == 0 {
		c, err := nftables.New()
		if err != nil {
			return 0, err
		}
		if _, err := c.ListTableOfFamily(t.Name, t.Family); err != nil {
			return 0, err
		}
		return time.Since(start), c.CloseLasting()
	}
	for i := range n {
		c, err := nftables.New()
		if err != nil {
			return 0, err
		}
		if err := c.SetDeleteElements(set, []nftables.SetElement{{Key: []byte{10, 0, 0, byte(i + 1)}}}); err != nil {
			return 0, err
		}
		if err := c.Flush(); err != nil {
			return 0, err
		}
		if err := c.CloseLasting(); err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}

// nftOrder is where an element-removing transaction's socket closes
// relative to a device deletion.
type nftOrder int

const (
	closeFirst nftOrder = iota // commit, close, then the devices
	atOnce                     // commit and close beside the devices
	closeLast                  // commit, the devices, then close
)

func (o nftOrder) String() string {
	return [...]string{"commit and close, then the devices", "commit and close beside the devices", "commit, the devices, then close"}[o]
}

// nftAndDevices times one element-removing transaction and one deletion
// of the devices as a group, with the nftables socket closed before,
// beside or after the deletion: whether the two grace-period waits
// overlap.
func nftAndDevices(o nftOrder, makers ...func() (netlink.Link, error)) (time.Duration, error) {
	links, err := makeUp(makers)
	if err != nil {
		return 0, err
	}
	const group = 0x51c1
	for _, l := range links {
		if err := netlink.LinkSetGroup(l, group); err != nil {
			return 0, err
		}
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: "qoscni-floor"}
	set := &nftables.Set{Table: t, Name: "s", KeyType: nftables.TypeIPAddr}
	key := []nftables.SetElement{{Key: []byte{10, 0, 1, 1}}}
	c, err := nftables.New()
	if err != nil {
		return 0, err
	}
	c.AddTable(t)
	if err := c.AddSet(set, key); err != nil {
		return 0, err
	}
	if err := c.Flush(); err != nil {
		return 0, err
	}
	devices := func() error {
		req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
		req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
		req.AddData(nl.NewRtAttr(unix.IFLA_GROUP, nl.Uint32Attr(group)))
		_, err := req.Execute(unix.NETLINK_ROUTE, 0)
		return err
	}
	start := time.Now()
	rc, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return 0, err
	}
	if err := rc.SetDeleteElements(set, key); err != nil {
		return 0, err
	}
	if err := rc.Flush(); err != nil {
		return 0, err
	}
	switch o {
	case closeFirst:
		if err := rc.CloseLasting(); err != nil {
			return 0, err
		}
		err = devices()
	case atOnce:
		var cerr error
		var wg sync.WaitGroup
		wg.Go(func() { cerr = rc.CloseLasting() })
		err = devices()
		wg.Wait()
		err = errors.Join(err, cerr)
	case closeLast:
		err = errors.Join(devices(), rc.CloseLasting())
	}
	return time.Since(start), err
}

func makeUp(makers []func() (netlink.Link, error)) ([]netlink.Link, error) {
	var links []netlink.Link
	for _, m := range makers {
		l, err := m()
		if err != nil {
			return nil, err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return nil, err
		}
		links = append(links, l)
	}
	return links, nil
}

// durableWrite writes a record the way a crash-safe store does: a temp
// file, fsync, rename over the name, fsync of the directory.
func durableWrite(dir string) (time.Duration, error) {
	d, err := os.MkdirTemp(dir, ".qoscni-floor-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(d)
	data := bytes.Repeat([]byte("x"), 600) // about a state record
	start := time.Now()
	tmp := filepath.Join(d, "r.tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return 0, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return 0, err
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, filepath.Join(d, "r")); err != nil {
		return 0, err
	}
	df, err := os.Open(d)
	if err != nil {
		return 0, err
	}
	defer df.Close()
	if err := df.Sync(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}
