package k8s_test

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/test/e2e/images"
)

// npPod is one pod of the NetworkPolicy truth table.
type npPod struct {
	ns, name string
	second   bool // on the second node
	v4, v6   string
	run      podRunner
}

func (p *npPod) String() string { return p.ns + "/" + p.name }

// npProbe is one connection attempt of the table.
type npProbe struct {
	from, to *npPod
	v6, udp  bool
}

func (p npProbe) String() string {
	proto, fam := "tcp/8080", "v4"
	if p.udp {
		proto = "udp/8081"
	}
	if p.v6 {
		fam = "v6"
	}
	return fmt.Sprintf("%-6s -> %-6s %s %s", p.from, p.to, fam, proto)
}

// reach makes the probe from inside the source pod's network namespace:
// TCP gets the workload's line, UDP the workload's answer to a datagram.
func (p npProbe) reach() bool {
	addr := p.to.v4
	if p.v6 {
		addr = p.to.v6
	}
	var script string
	if p.udp {
		// head reads the whole datagram (bash's read takes one byte of it
		// and loses the rest).
		script = "exec 3<>/dev/udp/" + addr + "/" + strconv.Itoa(images.WorkloadUDPPort) +
			" && for i in 1 2 3; do echo probe >&3; timeout 1 head -n1 <&3 && exit 0; done; exit 1"
	} else {
		script = "exec 3<>/dev/tcp/" + addr + "/" + strconv.Itoa(images.WorkloadTCPPort) + " && head -n1 <&3"
	}
	out, err := p.from.run.Try("timeout", "3", "bash", "-c", script)
	return err == nil && strings.Contains(out, p.to.name)
}

// networkPolicyStep: two namespaces, a pod of each on each node, and a
// sequence of NetworkPolicies covering pod and namespace selectors (and
// both in one peer), ipBlock with except, ports with protocol, a named
// port and endPort, ingress and egress, policyTypes and default deny;
// every pod pair is probed on TCP and UDP in both families after each
// change (IPv6 between pods of one node: the harness routes only IPv4
// between nodes), and the expected and observed matrices are printed
// side by side (the shape of upstream's netpol e2e suite). The node reaches every
// pod throughout (the kubelet's readiness probes keep them Ready).
func (e *env) networkPolicyStep(t *testing.T) {
	nss := map[string]string{"np-x": "x", "np-y": "y"}
	for ns, label := range nss {
		_, err := e.cp.Client.CoreV1().Namespaces().Create(ctx(t), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"team": label}}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
	}
	var pods []*npPod
	for _, ns := range []string{"np-x", "np-y"} {
		for _, p := range []*npPod{{ns: ns, name: "a"}, {ns: ns, name: "b", second: true}} {
			p.name = nss[ns] + "-" + p.name
			node := nodeName
			if p.second {
				node = node2Name
			}
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: p.name, Labels: map[string]string{"pod": p.name[2:]}},
				Spec: corev1.PodSpec{
					NodeSelector:                  map[string]string{corev1.LabelHostname: node},
					TerminationGracePeriodSeconds: new(int64),
					AutomountServiceAccountToken:  new(bool),
					Containers: []corev1.Container{{
						Name: "workload", Image: images.Workload, ImagePullPolicy: corev1.PullNever,
						Ports: []corev1.ContainerPort{{Name: "serve-tcp", ContainerPort: images.WorkloadTCPPort},
							{Name: "serve-udp", ContainerPort: images.WorkloadUDPPort, Protocol: corev1.ProtocolUDP}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(images.WorkloadTCPPort)}},
							PeriodSeconds: 1,
						},
					}},
				},
			}
			if _, err := e.cp.Client.CoreV1().Pods(ns).Create(ctx(t), pod, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			pods = append(pods, p)
		}
	}
	for _, p := range pods {
		var rec *state.Record
		waitFor(t, 90*time.Second, p.String()+" Ready with its record", func() error {
			got, err := e.cp.Client.CoreV1().Pods(p.ns).Get(ctx(t), p.name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			ready := false
			for _, c := range got.Status.Conditions {
				ready = ready || (c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue)
			}
			if !ready {
				return fmt.Errorf("not Ready")
			}
			if p.second {
				rec = e.recordOnIn(t, p.ns, p.name)
			} else {
				rec = e.recordIn(t, p.ns, p.name)
			}
			if rec == nil {
				return fmt.Errorf("no record")
			}
			return nil
		})
		for _, c := range rec.IPs {
			ip, _, _ := net.ParseCIDR(c)
			if ip.To4() != nil {
				p.v4 = ip.String()
			} else {
				p.v6 = ip.String()
			}
		}
		p.run = podRunner{netns: podNS(t, rec).Name}
		if p.second {
			p.run.prefix = e.n2.Exec
		}
	}
	xb, ya := pods[1], pods[2]
	var probes []npProbe
	for _, from := range pods {
		for _, to := range pods {
			if from == to {
				continue
			}
			for _, v6 := range []bool{false, true} {
				if v6 && from.second != to.second {
					// The harness's nodes have IPv4 addresses only: the
					// pod routes between them (host-gw) are IPv4.
					continue
				}
				for _, udp := range []bool{false, true} {
					probes = append(probes, npProbe{from: from, to: to, v6: v6, udp: udp})
				}
			}
		}
	}
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	sel := func(kv ...string) *metav1.LabelSelector {
		s := &metav1.LabelSelector{MatchLabels: map[string]string{}}
		for i := 0; i+1 < len(kv); i += 2 {
			s.MatchLabels[kv[i]] = kv[i+1]
		}
		return s
	}
	port := func(p intstr.IntOrString, proto *corev1.Protocol, end ...int32) networkingv1.NetworkPolicyPort {
		np := networkingv1.NetworkPolicyPort{Port: &p, Protocol: proto}
		if len(end) > 0 {
			np.EndPort = &end[0]
		}
		return np
	}
	prefix := func(ip string) string {
		if strings.Contains(ip, ":") {
			return ip + "/128"
		}
		return ip + "/32"
	}
	pol := func(ns, name string, s networkingv1.NetworkPolicySpec) *networkingv1.NetworkPolicy {
		return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: s}
	}
	steps := []struct {
		name     string
		policies []*networkingv1.NetworkPolicy
		allowed  func(p npProbe) bool
	}{
		{"no policies: all open", nil, func(npProbe) bool { return true }},
		{"np-x default deny ingress", []*networkingv1.NetworkPolicy{pol("np-x", "deny", networkingv1.NetworkPolicySpec{})},
			func(p npProbe) bool { return p.to.ns != "np-x" }},
		{"np-x: x-b takes pod=a of team y namespaces on its named port serve-tcp (namespace and pod selector in one peer)", []*networkingv1.NetworkPolicy{
			pol("np-x", "deny", networkingv1.NetworkPolicySpec{}),
			pol("np-x", "b-from-ya", networkingv1.NetworkPolicySpec{
				PodSelector: *sel("pod", "b"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("team", "y"), PodSelector: sel("pod", "a")}},
					Ports: []networkingv1.NetworkPolicyPort{port(intstr.FromString("serve-tcp"), &tcp)},
				}},
			}),
		}, func(p npProbe) bool {
			if p.to.ns != "np-x" {
				return true
			}
			return p.to == xb && p.from == ya && !p.udp
		}},
		{"np-y egress: y-a reaches only ipBlock x-b (v4 /32, v6 excepted) on UDP 8000-8100, and pods of np-y on TCP", []*networkingv1.NetworkPolicy{
			pol("np-y", "a-out", networkingv1.NetworkPolicySpec{
				PodSelector: *sel("pod", "a"),
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress: []networkingv1.NetworkPolicyEgressRule{
					{
						To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: prefix(xb.v4)}},
							{IPBlock: &networkingv1.IPBlock{CIDR: "::/0", Except: []string{prefix(xb.v6)}}}},
						Ports: []networkingv1.NetworkPolicyPort{port(intstr.FromInt32(8000), &udp, 8100)},
					},
					{To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}}, Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp}}},
				},
			}),
		}, func(p npProbe) bool {
			if p.from != ya {
				return true
			}
			switch {
			case p.to == xb && p.udp:
				return !p.v6
			case p.to.ns == "np-y" && !p.udp:
				return true
			case p.v6 && p.udp:
				return true // ::/0 except x-b's address
			}
			return false
		}},
		{"both ways in np-x: ingress only from np-x, egress only to team y on UDP", []*networkingv1.NetworkPolicy{
			pol("np-x", "both", networkingv1.NetworkPolicySpec{
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}}}},
				Egress: []networkingv1.NetworkPolicyEgressRule{{
					To:    []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("team", "y")}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp}},
				}},
			}),
		}, func(p npProbe) bool {
			if p.from.ns == "np-x" && !(p.to.ns == "np-y" && p.udp) {
				return false
			}
			if p.to.ns == "np-x" && p.from.ns != "np-x" {
				return false
			}
			return true
		}},
		{"all removed: all open", nil, func(npProbe) bool { return true }},
	}
	applied := map[string]bool{}
	for _, s := range steps {
		// Replace the policies: delete what this step lacks, apply its own.
		want := map[string]bool{}
		for _, p := range s.policies {
			want[p.Namespace+"/"+p.Name] = true
			_, err := e.cp.Client.NetworkingV1().NetworkPolicies(p.Namespace).Create(ctx(t), p, metav1.CreateOptions{})
			if err != nil && strings.Contains(err.Error(), "already exists") {
				cur, gerr := e.cp.Client.NetworkingV1().NetworkPolicies(p.Namespace).Get(ctx(t), p.Name, metav1.GetOptions{})
				if gerr == nil {
					p.ResourceVersion = cur.ResourceVersion
					_, err = e.cp.Client.NetworkingV1().NetworkPolicies(p.Namespace).Update(ctx(t), p, metav1.UpdateOptions{})
				}
			}
			if err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
		}
		for k := range applied {
			if !want[k] {
				ns, name, _ := strings.Cut(k, "/")
				if err := e.cp.Client.NetworkingV1().NetworkPolicies(ns).Delete(ctx(t), name, metav1.DeleteOptions{}); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
			}
		}
		applied = want
		// Both agents see the change within a second or two; the table is
		// then taken until it matches (10 s at most), and printed.
		var table string
		var bad int
		start := time.Now()
		for {
			table, bad = npTable(probes, s.allowed)
			if bad == 0 || time.Since(start) > 10*time.Second {
				break
			}
		}
		if bad > 0 {
			t.Errorf("%s: %d of %d probes differ:\n%s", s.name, bad, len(probes), table)
		} else {
			t.Logf("%s: %d probes as expected, after %v\n%s", s.name, len(probes), time.Since(start).Round(time.Millisecond), table)
		}
		// The node where a pod runs reaches it whatever the policies
		// (kubelet probes), as the API documents.
		for _, p := range pods {
			from := runnerFunc(e.tryHere)
			if p.second {
				from = e.tryOn
			}
			if out, err := tcpLine(from, p.v4, images.WorkloadTCPPort); err != nil || !strings.Contains(out, p.name) {
				t.Errorf("%s: its node to %s: %q %v", s.name, p, out, err)
			}
		}
	}
	for ns := range nss {
		if err := e.cp.Client.CoreV1().Namespaces().Delete(ctx(t), ns, metav1.DeleteOptions{}); err != nil {
			t.Error(err)
		}
	}
	waitFor(t, 90*time.Second, "the truth table's pods gone", func() error {
		for ns := range nss {
			l, err := e.cp.Client.CoreV1().Pods(ns).List(ctx(t), metav1.ListOptions{})
			if err != nil {
				return err
			}
			if len(l.Items) > 0 {
				return fmt.Errorf("%d pods left in %s", len(l.Items), ns)
			}
		}
		return nil
	})
}

// runnerFunc adapts a node's try function to tcpLine.
type runnerFunc func(args ...string) (string, error)

func (f runnerFunc) Try(name string, args ...string) (string, error) {
	return f(append([]string{name}, args...)...)
}

// npTable probes all at once (16 at a time) and returns the expected and
// observed matrix and how many differ.
func npTable(probes []npProbe, allowed func(npProbe) bool) (string, int) {
	got := make([]bool, len(probes))
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i, p := range probes {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			got[i] = p.reach()
		})
	}
	wg.Wait()
	var b strings.Builder
	bad := 0
	fmt.Fprintf(&b, "%-32s %-8s %-8s\n", "probe", "expected", "observed")
	for i, p := range probes {
		want := allowed(p)
		mark := ""
		if got[i] != want {
			mark = "  <-- differs"
			bad++
		}
		fmt.Fprintf(&b, "%-32s %-8v %-8v%s\n", p, want, got[i], mark)
	}
	return b.String(), bad
}
