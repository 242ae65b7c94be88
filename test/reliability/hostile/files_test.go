// Package hostile_test feeds the built qoscni plugin what a node can hold
// after a crash, a disk error or an operator's mistake (corrupted,
// truncated, foreign files in the state and IPAM directories), input at
// the limits of what runtimes send, and checks the security properties of
// the files it writes and of the agent's HTTP endpoint.
//
//	QOSCNI_REQUIRE_ROOT=1 go test -count=1 -v ./reliability/hostile
package hostile_test

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/testnet"
	"github.com/qoscni/qoscni/test/reliability/reltest"
)

const callLimit = 2 * time.Minute

func podArgs(cid string) string {
	return "K8S_POD_NAMESPACE=hostile;K8S_POD_NAME=" + cid + ";K8S_POD_UID=uid-" + cid
}

// mustAdd ADDs an attachment and returns the result and its addresses.
func mustAdd(t *testing.T, n *testnet.Node, cid, ifname string, ns *testnet.NS, conf []byte) ([]byte, []string) {
	t.Helper()
	o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: cid, Netns: ns.Path, IfName: ifname, Args: podArgs(cid), Config: conf}, callLimit)
	if o.Err != nil {
		t.Fatalf("ADD %s/%s: %s", cid, ifname, o)
	}
	return o.Stdout, addrs(t, o.Stdout)
}

func mustOK(t *testing.T, what string, o reltest.Outcome) {
	t.Helper()
	if o.Err != nil {
		t.Fatalf("%s: %s", what, o)
	}
}

func put(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// replace swaps the file for a new inode: the address files of one ADD are
// hard links of one inode, so writing through one would change them all.
func replace(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".hostile"
	put(t, tmp, data)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func sparse(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// reservedOnDisk lists every name in the IPAM store that is an address:
// reservations with any content, directories, symlinks.
func reservedOnDisk(t *testing.T, dir string) map[string]bool {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, e := range entries {
		if a, err := netip.ParseAddr(e.Name()); err == nil {
			out[a.String()] = true
		}
	}
	return out
}

func hasLink(t *testing.T, n *testnet.Node, name string) bool {
	t.Helper()
	_, err := n.Try("ip", "link", "show", "dev", name)
	return err == nil
}

// nftHas reports whether the qoscni table mentions s as a whole token (an
// address or a port), not as a prefix of a longer one.
func nftHas(t *testing.T, n *testnet.Node, s string) bool {
	t.Helper()
	out, _ := n.Try("nft", "list", "table", "inet", "qoscni")
	return regexp.MustCompile(`(^|[^0-9a-fA-F:.])` + regexp.QuoteMeta(s) + `($|[^0-9a-fA-F:.])`).MatchString(out)
}

// otherConf is a second qoscni network on the same node, sharing the
// state and IPAM roots, as a node with two qoscni networks has.
func otherConf(n *testnet.Node) []byte {
	return hostileNet.ConfWith(n, func(c map[string]any) {
		c["name"] = "qother"
		c["bridge"] = "qobr0"
		c["isDefaultGateway"] = false // the pod's default routes are eth0's
		c["ipam"] = map[string]any{
			"ranges":  []any{[]any{map[string]any{"subnet": "10.98.0.0/24"}}, []any{map[string]any{"subnet": "fd98::/64"}}},
			"dataDir": n.IPAMDir,
		}
	})
}

// TestCorruptedStateAndIPAMFiles puts garbage, truncated JSON, a record of
// another network, directories where files belong, symlinks and huge
// files into the state and IPAM directories, next to valid records and
// reservations. Then:
//   - pods not concerned ADD, CHECK and DEL as usual;
//   - each affected attachment gets a CNI error naming it (and the file
//     when the file is what is wrong) and nothing changes;
//   - DEL of an attachment whose record is garbage removes everything;
//   - GC removes an attachment the runtime no longer lists even though its
//     record is truncated, leaves the valid ones (of this network and of
//     another) alone, and frees a reservation held by a foreign owner;
//   - handing out every free address afterwards never gives one that was
//     on disk (valid, unknown owner, directory, symlink) or gives one twice.
func TestCorruptedStateAndIPAMFiles(t *testing.T) {
	n := testnet.NewNode(t)
	_ = testnet.PluginBinary(t)
	stateDir := filepath.Join(n.StateDir, network)
	ipamDir := filepath.Join(n.IPAMDir, network)

	type live struct {
		cid  string
		ns   *testnet.NS
		conf []byte
		res  []byte
		ips  []string
	}
	start := func(cid string, mutate func(map[string]any)) *live {
		p := &live{cid: cid, ns: n.NewPod(t), conf: hostileNet.ConfWith(n, mutate)}
		p.res, p.ips = mustAdd(t, n, cid, "eth0", p.ns, p.conf)
		return p
	}
	good1 := start("good1", shapedPorts(8081))
	good2 := start("good2", nil)
	vdel := start("vdel", shapedPorts(8082))
	vgc := start("vgc", shapedPorts(8083))
	vipam := start("vipam", nil)
	// good1 is also attached to a second qoscni network as net1.
	other := otherConf(n)
	otherRes, _ := mustAdd(t, n, "good1", "net1", good1.ns, other)

	// --- The state directory.
	rec := func(cid string) string { return filepath.Join(stateDir, cid+"_eth0.json") }
	good2Rec, err := os.ReadFile(rec("good2"))
	if err != nil {
		t.Fatal(err)
	}
	put(t, rec("vdel"), []byte("\x00\xff\xfe garbage {{{"))
	vgcRec, _ := os.ReadFile(rec("vgc"))
	put(t, rec("vgc"), vgcRec[:len(vgcRec)/2])
	put(t, filepath.Join(stateDir, "trunc_eth0.json"), good2Rec[:len(good2Rec)/3])
	// A record of the other network, misplaced into this network's directory.
	otherRec, err := os.ReadFile(filepath.Join(n.StateDir, "qother", "good1_net1.json"))
	if err != nil {
		t.Fatal(err)
	}
	put(t, filepath.Join(stateDir, "good1_net1.json"), otherRec)
	if err := os.Mkdir(filepath.Join(stateDir, "dir_eth0.json"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(rec("vdir"), 0o700); err != nil { // where vdir's record would go
		t.Fatal(err)
	}
	if err := os.Symlink(rec("good2"), filepath.Join(stateDir, "link_eth0.json")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/nonexistent/qoscni", filepath.Join(stateDir, "dangling_eth0.json")); err != nil {
		t.Fatal(err)
	}
	sparse(t, filepath.Join(stateDir, "huge_eth0.json"), 64<<20)

	// --- The IPAM directory.
	ip4 := func(p *live) string { return p.ips[0] }
	replace(t, filepath.Join(ipamDir, ip4(vipam)), []byte("\x00garbage\xff"))
	put(t, filepath.Join(ipamDir, "10.97.0.40"), []byte(`{"containerID":"x`))
	put(t, filepath.Join(ipamDir, "10.97.0.41"), []byte(`{"containerID":"ghost","ifName":"eth0"}`+"\n"))
	if err := os.Mkdir(filepath.Join(ipamDir, "10.97.0.42"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(ipamDir, ip4(good2)), filepath.Join(ipamDir, "10.97.0.43")); err != nil {
		t.Fatal(err)
	}
	sparse(t, filepath.Join(ipamDir, "10.97.0.44"), 64<<20)
	put(t, filepath.Join(ipamDir, "fd97::30"), []byte("\xff\xfe"))
	put(t, filepath.Join(ipamDir, "last_reserved_ip.0"), []byte("not an address\x00"))
	put(t, filepath.Join(ipamDir, "last_reserved_ip.1"), []byte("fd97::30%eth0\n"))
	put(t, filepath.Join(ipamDir, "attachments", "good2_eth0"), []byte(`{"containerID":"good2","ifName":"eth0","ips":["10.97`))
	if err := os.Mkdir(filepath.Join(ipamDir, "attachments", "vidx_eth0"), 0o700); err != nil { // where vidx's index would go
		t.Fatal(err)
	}
	put(t, filepath.Join(ipamDir, "attachments", "junk"), []byte("\x00\x01"))
	for _, name := range []string{"garbage name", ".hidden", "10.97.0.007"} {
		put(t, filepath.Join(ipamDir, name), []byte("foreign"))
	}

	checkOf := func(p *live, conf, res []byte, ifname string) reltest.Outcome {
		return reltest.Invoke(t, n, reltest.Call{Command: "CHECK", ContainerID: p.cid, Netns: p.ns.Path, IfName: ifname, Args: podArgs(p.cid), Config: reltest.WithPrev(conf, res)}, callLimit)
	}

	// --- Pods not concerned work as usual.
	t.Run("others unaffected", func(t *testing.T) {
		mustOK(t, "CHECK good1", checkOf(good1, good1.conf, good1.res, "eth0"))
		mustOK(t, "CHECK good2 (its IPAM index truncated)", checkOf(good2, good2.conf, good2.res, "eth0"))
		mustOK(t, "CHECK good1/net1 of the other network", checkOf(good1, other, otherRes, "net1"))
		ns := n.NewPod(t)
		res, ips := mustAdd(t, n, "new1", "eth0", ns, hostileNet.ConfWith(n, shapedPorts(8084)))
		for _, ip := range ips {
			if !exists(filepath.Join(ipamDir, ip)) {
				t.Errorf("new1's address %s has no reservation file", ip)
			}
		}
		mustOK(t, "CHECK new1", reltest.Invoke(t, n, reltest.Call{Command: "CHECK", ContainerID: "new1", Netns: ns.Path, IfName: "eth0", Config: reltest.WithPrev(hostileNet.ConfWith(n, shapedPorts(8084)), res)}, callLimit))
		mustOK(t, "DEL new1", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "new1", Netns: ns.Path, IfName: "eth0", Config: hostileNet.ConfWith(n, nil)}, callLimit))
		if hasLink(t, n, podnet.HostVethName("new1", "eth0")) || exists(rec("new1")) {
			t.Error("DEL new1 left its veth or record")
		}
	})

	// --- Each affected attachment: a CNI error naming it, nothing changed.
	t.Run("affected attachments get clear errors", func(t *testing.T) {
		o := checkOf(vdel, vdel.conf, vdel.res, "eth0")
		t.Logf("CHECK vdel (garbage record): %s", o)
		if o.Err == nil || o.Hung {
			t.Fatalf("CHECK of an attachment with a garbage record: %s", o)
		}
		if !strings.Contains(o.Err.Msg, "vdel/eth0") {
			t.Errorf("CHECK vdel: message %q does not name the attachment", o.Err.Msg)
		}
		if !strings.Contains(o.Err.Msg, rec("vdel")) {
			t.Errorf("CHECK vdel: message %q does not name the file %s", o.Err.Msg, rec("vdel"))
		}

		o = checkOf(vipam, vipam.conf, vipam.res, "eth0")
		t.Logf("CHECK vipam (garbage address file): %s", o)
		if o.Err == nil || o.Hung || !strings.Contains(o.Err.Msg, "vipam/eth0") || !strings.Contains(o.Err.Msg, ip4(vipam)) {
			t.Errorf("CHECK of an attachment whose reservation is garbage: want an error naming it and %s, got %s", ip4(vipam), o)
		}

		// A garbage record of an attachment that was never wired (what a
		// broken disk leaves): ADD replaces it.
		put(t, rec("vstale"), []byte(`{"schema":1,"network":"qhost`))
		ns := n.NewPod(t)
		sc := hostileNet.ConfWith(n, nil)
		o = reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: "vstale", Netns: ns.Path, IfName: "eth0", Args: podArgs("vstale"), Config: sc}, callLimit)
		if o.Err != nil {
			t.Errorf("ADD over a garbage record of the same attachment: %s", o)
		} else {
			mustOK(t, "CHECK vstale", reltest.Invoke(t, n, reltest.Call{Command: "CHECK", ContainerID: "vstale", Netns: ns.Path, IfName: "eth0", Config: reltest.WithPrev(sc, o.Stdout)}, callLimit))
			mustOK(t, "DEL vstale", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "vstale", Netns: ns.Path, IfName: "eth0", Config: sc}, callLimit))
		}

		before := reltest.TakeSnapshot(t, n)
		for _, c := range []struct{ cid, file string }{{"vdir", rec("vdir")}, {"vidx", filepath.Join(ipamDir, "attachments", "vidx_eth0")}} {
			ns := n.NewPod(t)
			o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: c.cid, Netns: ns.Path, IfName: "eth0", Args: podArgs(c.cid), Config: hostileNet.ConfWith(n, shapedPorts(8085))}, callLimit)
			t.Logf("ADD %s (a directory at %s): %s", c.cid, c.file, o)
			if o.Err == nil || o.Hung {
				t.Errorf("ADD %s with a directory where its file goes: %s", c.cid, o)
				continue
			}
			if !strings.Contains(o.Err.Msg, c.file) {
				t.Errorf("ADD %s: message %q does not name %s", c.cid, o.Err.Msg, c.file)
			}
			if out := ns.Exec(t, "ip", "-o", "link"); strings.Contains(out, "eth0") {
				t.Errorf("refused ADD %s left eth0 in the pod: %s", c.cid, out)
			}
		}
		if d := before.Diff(reltest.TakeSnapshot(t, n)); len(d) > 0 {
			t.Errorf("refused ADDs changed the node:\n%s", strings.Join(d, "\n"))
		}
	})

	// --- DEL with a garbage record still removes everything.
	t.Run("DEL recovers", func(t *testing.T) {
		mustOK(t, "DEL vdel", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "vdel", Netns: vdel.ns.Path, IfName: "eth0", Config: hostileNet.ConfWith(n, nil)}, callLimit))
		for _, l := range []string{podnet.HostVethName("vdel", "eth0"), podnet.IFBName("vdel", "eth0")} {
			if hasLink(t, n, l) {
				t.Errorf("DEL vdel left %s", l)
			}
		}
		if exists(rec("vdel")) {
			t.Error("DEL vdel left its garbage record")
		}
		for _, ip := range vdel.ips {
			if exists(filepath.Join(ipamDir, ip)) {
				t.Errorf("DEL vdel left its address %s reserved", ip)
			}
			if nftHas(t, n, ip) {
				t.Errorf("DEL vdel left nftables elements for %s", ip)
			}
		}
		if nftHas(t, n, "8082") {
			t.Error("DEL vdel left its hostPort 8082")
		}
		mustOK(t, "DEL vipam", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "vipam", Netns: vipam.ns.Path, IfName: "eth0", Config: hostileNet.ConfWith(n, nil)}, callLimit))
		if hasLink(t, n, podnet.HostVethName("vipam", "eth0")) || exists(rec("vipam")) || exists(filepath.Join(ipamDir, vipam.ips[1])) {
			t.Error("DEL vipam left its veth, record or IPv6 reservation")
		}
		// The garbage file keeps its address: its owner cannot be known.
		if !exists(filepath.Join(ipamDir, ip4(vipam))) {
			t.Errorf("the unreadable reservation %s was freed", ip4(vipam))
		}
	})

	// --- GC: the runtime lists good1 and good2 (and, for the other
	// network, good1/net1); vgc's sandbox is gone and its record truncated.
	t.Run("GC recovers", func(t *testing.T) {
		testnet.Run(t, "ip", "netns", "del", vgc.ns.Name)
		start := time.Now()
		o := reltest.Invoke(t, n, reltest.Call{Command: "GC", Config: hostileNet.GCConf(n, "good1/eth0", "good2/eth0")}, callLimit)
		t.Logf("GC over the corrupted directories: %s in %v", o, o.Took.Round(time.Millisecond))
		if o.Hung {
			t.Fatalf("GC hung")
		}
		if o.Err != nil {
			t.Errorf("GC: %s", o)
		}
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("GC took %v", d)
		}
		// The valid attachments, of both networks, are untouched.
		mustOK(t, "CHECK good1 after GC", checkOf(good1, good1.conf, good1.res, "eth0"))
		mustOK(t, "CHECK good2 after GC", checkOf(good2, good2.conf, good2.res, "eth0"))
		if oc := checkOf(good1, other, otherRes, "net1"); oc.Err != nil {
			t.Errorf("GC of %s broke good1/net1 of network qother (a copy of its record was misplaced into %s): CHECK %s", network, stateDir, oc)
		}
		if !hasLink(t, n, podnet.HostVethName("good1", "net1")) {
			t.Errorf("GC of %s deleted %s, the host veth of good1/net1 of network qother", network, podnet.HostVethName("good1", "net1"))
		}
		if !exists(filepath.Join(n.StateDir, "qother", "good1_net1.json")) {
			t.Errorf("GC of %s deleted network qother's record of good1/net1", network)
		}
		// vgc is gone entirely.
		var left []string
		if hasLink(t, n, podnet.IFBName("vgc", "eth0")) {
			left = append(left, "IFB "+podnet.IFBName("vgc", "eth0"))
		}
		for _, ip := range vgc.ips {
			if exists(filepath.Join(ipamDir, ip)) {
				left = append(left, "reservation "+ip)
			}
			if nftHas(t, n, ip) {
				left = append(left, "nftables element for "+ip)
			}
		}
		if nftHas(t, n, "8083") {
			left = append(left, "hostPort 8083")
		}
		if exists(rec("vgc")) {
			left = append(left, "truncated record "+rec("vgc"))
		}
		if len(left) > 0 {
			t.Errorf("GC left vgc (not listed, record truncated) behind: %s", strings.Join(left, "; "))
		}
		if exists(filepath.Join(ipamDir, "10.97.0.41")) {
			t.Error("GC kept the reservation of ghost/eth0, an attachment nobody lists")
		}
		var kept []string
		for _, name := range []string{ip4(vipam), "10.97.0.40", "10.97.0.42", "10.97.0.43", "10.97.0.44", "fd97::30"} {
			if !exists(filepath.Join(ipamDir, name)) {
				t.Errorf("GC freed %s, whose owner cannot be read", name)
			} else {
				kept = append(kept, name)
			}
		}
		// GC replaced the directory where vidx's IPAM index goes: its ADD
		// works now. The directory where vdir's record goes is not GC's to
		// remove (an operator put it there): its ADD still fails, clearly.
		for _, cid := range []string{"vidx", "vdir"} {
			ns := n.NewPod(t)
			c := hostileNet.ConfWith(n, nil)
			o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: cid, Netns: ns.Path, IfName: "eth0", Args: podArgs(cid), Config: c}, callLimit)
			t.Logf("ADD %s after GC: %s", cid, o)
			if cid == "vidx" && o.Err != nil {
				t.Errorf("ADD vidx after GC: %s", o)
			}
			if o.Err == nil {
				mustOK(t, "DEL "+cid, reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: cid, Netns: ns.Path, IfName: "eth0", Config: c}, callLimit))
			}
		}
		entries, _ := os.ReadDir(stateDir)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Logf("after GC: unreadable reservations kept %v; state dir holds %v", kept, names)
	})

	// --- Every free address, handed out: none that was on disk, none twice.
	t.Run("no address handed out twice", func(t *testing.T) {
		reserved := reservedOnDisk(t, ipamDir)
		for _, p := range []*live{good1, good2} {
			for _, ip := range p.ips {
				if !reserved[ip] {
					t.Errorf("live %s's address %s is not reserved on disk", p.cid, ip)
				}
			}
		}
		nss := []*testnet.NS{n.NewPod(t), n.NewPod(t), n.NewPod(t), n.NewPod(t)}
		type got struct {
			cid, ifname string
			ns          *testnet.NS
			ips         []string
		}
		var (
			mu        sync.Mutex
			handed    []got
			refusals  []string
			wg        sync.WaitGroup
			sem       = make(chan struct{}, 8)
			conf      = hostileNet.ConfWith(n, nil)
			attempted int
		)
		// 40 addresses per family exist; ask for more than are left.
		for i := 0; i < 44; i++ {
			ns := nss[i%len(nss)]
			cid, ifname := fmt.Sprintf("fill%02d", i), fmt.Sprintf("e%d", i/len(nss))
			attempted++
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				o := reltest.Invoke(t, n, reltest.Call{Command: "ADD", ContainerID: cid, Netns: ns.Path, IfName: ifname, Args: podArgs(cid), Config: conf}, callLimit)
				mu.Lock()
				defer mu.Unlock()
				if o.Err != nil {
					refusals = append(refusals, fmt.Sprintf("%s: %s", cid, o))
					return
				}
				handed = append(handed, got{cid, ifname, ns, addrs(t, o.Stdout)})
			}()
		}
		wg.Wait()
		seen := map[string]string{}
		var v4 int
		for _, g := range handed {
			for _, ip := range g.ips {
				if reserved[ip] {
					t.Errorf("%s got %s, which was reserved on disk", g.cid, ip)
				}
				if prev, dup := seen[ip]; dup {
					t.Errorf("%s handed to %s and %s", ip, prev, g.cid)
				}
				seen[ip] = g.cid
				if strings.Contains(ip, ".") {
					v4++
				}
			}
		}
		var inRange4 int
		for ip := range reserved {
			a := netip.MustParseAddr(ip)
			if a.Is4() && a.Compare(netip.MustParseAddr("10.97.0.10")) >= 0 && a.Compare(netip.MustParseAddr("10.97.0.49")) <= 0 {
				inRange4++
			}
		}
		sort.Strings(refusals)
		t.Logf("%d ADDs: %d succeeded (%d IPv4 of the %d free), %d refused; %d addresses were on disk (%d in the IPv4 range)",
			attempted, len(handed), v4, 40-inRange4, len(refusals), len(reserved), inRange4)
		if v4 != 40-inRange4 {
			t.Errorf("handed out %d IPv4 addresses, want every free one (%d)", v4, 40-inRange4)
		}
		for _, r := range refusals {
			if !strings.Contains(r, "no free address") {
				t.Errorf("refusal other than exhaustion: %s", r)
			}
		}
		for _, g := range handed {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if o := reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: g.cid, Netns: g.ns.Path, IfName: g.ifname, Config: conf}, callLimit); o.Err != nil {
					t.Errorf("DEL %s: %s", g.cid, o)
				}
			}()
		}
		wg.Wait()
		for _, r := range refusals {
			cid, _, _ := strings.Cut(r, ":")
			for _, p := range handed {
				if p.cid == cid {
					t.Errorf("%s both refused and added", cid)
				}
			}
		}
	})

	// --- The end: everything of the live pods goes; only the unreadable
	// files stay.
	mustOK(t, "DEL good1", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "good1", Netns: good1.ns.Path, IfName: "eth0", Config: hostileNet.ConfWith(n, nil)}, callLimit))
	mustOK(t, "DEL good2", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "good2", Netns: good2.ns.Path, IfName: "eth0", Config: hostileNet.ConfWith(n, nil)}, callLimit))
	mustOK(t, "DEL good1/net1", reltest.Invoke(t, n, reltest.Call{Command: "DEL", ContainerID: "good1", Netns: good1.ns.Path, IfName: "net1", Config: other}, callLimit))
	mustOK(t, "GC of nothing", reltest.Invoke(t, n, reltest.Call{Command: "GC", Config: hostileNet.GCConf(n)}, callLimit))
	out := n.Exec(t, "ip", "-o", "link", "show")
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 1 && (strings.HasPrefix(f[1], "qv") || strings.HasPrefix(f[1], "qi")) {
			t.Errorf("device left on the node: %s", f[1])
		}
	}
	var index []string
	entries, _ := os.ReadDir(filepath.Join(ipamDir, "attachments"))
	for _, e := range entries {
		index = append(index, e.Name())
	}
	if len(index) > 0 {
		t.Errorf("IPAM index entries left after the last GC: %v", index)
	}
	b, _ := json.Marshal(reservedOnDisk(t, ipamDir))
	t.Logf("reservations left (unreadable owners, by design): %s", b)
}
