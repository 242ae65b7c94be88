package netpol

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/qoscni/qoscni/internal/cni/netpolnft"
)

// allows is what the data plane does with a new connection from src to
// dst, given d (ruleset.go's chains, step by step): a pending address is
// closed both ways; an egress-isolated source needs an egress allowance,
// an ingress-isolated destination an ingress one.
func (d *Desired) allows(local map[netip.Addr]bool, src, dst netip.Addr, proto uint8, port uint16) bool {
	for _, a := range []netip.Addr{src, dst} {
		if _, ready := d.Ready[a]; local[a] && !ready {
			return false
		}
	}
	if _, iso := d.EgressIsolated[src]; iso && !d.Egress.has(d.Idents, src, dst, proto, port) {
		return false
	}
	if _, iso := d.IngressIsolated[dst]; iso && !d.Ingress.has(d.Idents, dst, src, proto, port) {
		return false
	}
	return true
}

// has looks (pod, peer, proto, port) up as the sets do: by the peer's
// identity, then by the peer's address.
func (r Rules) has(idents map[netip.Addr]uint32, pod, peer netip.Addr, proto uint8, port uint16) bool {
	in := func(l L4) bool {
		return l.ProtoLo <= proto && proto <= l.ProtoHi && l.PortLo <= port && port <= l.PortHi
	}
	if id, ok := idents[peer]; ok {
		for e := range r.Ident {
			if e.Pod == pod && e.Ident == id && in(e.L4) {
				return true
			}
		}
	}
	for e := range r.Block {
		if e.Pod == pod && !peer.Less(e.PeerLo) && !e.PeerHi.Less(peer) && in(e.L4) {
			return true
		}
	}
	return false
}

// oracle decides the same straight from the API's words, with none of
// the compiler's machinery: is a new connection from src to dst allowed
// by the policies of the node's pods (local) it concerns?
type oracle struct {
	in    Input
	local map[netip.Addr]types.NamespacedName
}

func (o oracle) pod(a netip.Addr) *corev1.Pod {
	for _, p := range o.in.Pods {
		if p.Spec.HostNetwork || terminal(p) {
			continue
		}
		name := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
		for _, at := range o.in.Local {
			if at.Pod == name && slices.Contains(at.Addrs, a) {
				return p
			}
		}
		for _, ip := range p.Status.PodIPs {
			if ip.IP == a.String() {
				return p
			}
		}
	}
	return nil
}

func (o oracle) allows(src, dst netip.Addr, proto uint8, port uint16) bool {
	sp, dp := o.pod(src), o.pod(dst)
	if _, ok := o.local[src]; ok {
		if sp == nil {
			return false
		}
		if !o.direction(sp, dp, dst, proto, port, true) {
			return false
		}
	}
	if _, ok := o.local[dst]; ok {
		if dp == nil {
			return false
		}
		if !o.direction(dp, sp, src, proto, port, false) {
			return false
		}
	}
	return true
}

// direction: may pod (the local one) send to (egress) or receive from
// peer (its pod, nil if none) at peerAddr?
func (o oracle) direction(pod, peer *corev1.Pod, peerAddr netip.Addr, proto uint8, port uint16, egress bool) bool {
	isolated := false
	for _, np := range o.in.Policies {
		if np.Namespace != pod.Namespace || !selects(&np.Spec.PodSelector, pod.Labels) {
			continue
		}
		types := np.Spec.PolicyTypes
		if len(types) == 0 {
			types = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
			if len(np.Spec.Egress) > 0 {
				types = append(types, networkingv1.PolicyTypeEgress)
			}
		}
		want := networkingv1.PolicyTypeIngress
		if egress {
			want = networkingv1.PolicyTypeEgress
		}
		if !slices.Contains(types, want) {
			continue
		}
		isolated = true
		if egress {
			for _, r := range np.Spec.Egress {
				if o.peerMatches(np.Namespace, r.To, peer, peerAddr) && portMatches(r.Ports, peer, proto, port) {
					return true
				}
			}
		} else {
			for _, r := range np.Spec.Ingress {
				if o.peerMatches(np.Namespace, r.From, peer, peerAddr) && portMatches(r.Ports, pod, proto, port) {
					return true
				}
			}
		}
	}
	return !isolated
}

func selects(s *metav1.LabelSelector, l map[string]string) bool {
	sel, err := metav1.LabelSelectorAsSelector(s)
	return err == nil && sel.Matches(labels.Set(l))
}

func (o oracle) nsLabels(name string) map[string]string {
	for _, ns := range o.in.Namespaces {
		if ns.Name == name {
			return ns.Labels
		}
	}
	return map[string]string{corev1.LabelMetadataName: name}
}

func (o oracle) peerMatches(ns string, peers []networkingv1.NetworkPolicyPeer, peer *corev1.Pod, addr netip.Addr) bool {
	if len(peers) == 0 {
		return true
	}
	for _, p := range peers {
		if p.IPBlock != nil {
			c := netip.MustParsePrefix(p.IPBlock.CIDR)
			if !c.Contains(addr) {
				continue
			}
			excepted := false
			for _, e := range p.IPBlock.Except {
				if netip.MustParsePrefix(e).Contains(addr) {
					excepted = true
				}
			}
			if !excepted {
				return true
			}
			continue
		}
		if peer == nil {
			continue
		}
		if p.NamespaceSelector == nil && peer.Namespace != ns {
			continue
		}
		if p.NamespaceSelector != nil && !selects(p.NamespaceSelector, o.nsLabels(peer.Namespace)) {
			continue
		}
		if p.PodSelector != nil && !selects(p.PodSelector, peer.Labels) {
			continue
		}
		return true
	}
	return false
}

// portMatches: dstPod is the pod receiving (whose named ports count).
func portMatches(ports []networkingv1.NetworkPolicyPort, dstPod *corev1.Pod, proto uint8, port uint16) bool {
	if len(ports) == 0 {
		return true
	}
	for _, p := range ports {
		want := corev1.ProtocolTCP
		if p.Protocol != nil {
			want = *p.Protocol
		}
		if protoNumber(want) != proto {
			continue
		}
		switch {
		case p.Port == nil:
			return true
		case p.Port.Type == intstr.String:
			if dstPod == nil {
				continue
			}
			for _, c := range dstPod.Spec.Containers {
				for _, cp := range c.Ports {
					cpProto := cp.Protocol
					if cpProto == "" {
						cpProto = corev1.ProtocolTCP
					}
					if cp.Name == p.Port.StrVal && cpProto == want && int(cp.ContainerPort) == int(port) {
						return true
					}
				}
			}
		default:
			end := p.Port.IntVal
			if p.EndPort != nil {
				end = *p.EndPort
			}
			if int32(port) >= p.Port.IntVal && int32(port) <= end {
				return true
			}
		}
	}
	return false
}

// world is a random cluster: namespaces, pods (some on this node), and
// policies drawn from every feature of the API.
type world struct {
	in     Input
	local  map[netip.Addr]types.NamespacedName
	addrs  []netip.Addr // pods' and outsiders'
	r      *rand.Rand
	labels []string
}

func newWorld(seed uint64) *world {
	w := &world{r: rand.New(rand.NewPCG(seed, 21)), local: map[netip.Addr]types.NamespacedName{},
		labels: []string{"a", "b", "c"}}
	for i, name := range []string{"red", "blue", "green"} {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			corev1.LabelMetadataName: name, "team": []string{"x", "y"}[i%2]}}}
		w.in.Namespaces = append(w.in.Namespaces, ns)
	}
	n := 0
	for _, ns := range w.in.Namespaces {
		for range 3 + w.r.IntN(3) {
			n++
			p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns.Name, Name: fmt.Sprintf("p%d", n), Labels: w.someLabels()}}
			p.Spec.Containers = []corev1.Container{{Name: "c", Ports: w.somePorts()}}
			v4 := netip.AddrFrom4([4]byte{10, 1, byte(n / 256), byte(n % 256)})
			v6 := netip.MustParseAddr(fmt.Sprintf("fd00:1::%x", n))
			name := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
			switch w.r.IntN(10) {
			case 0: // host network: not a peer
				p.Spec.HostNetwork = true
			case 1: // finished: its address is not its any more
				p.Status.Phase = corev1.PodSucceeded
				p.Status.PodIPs = []corev1.PodIP{{IP: v4.String()}}
			}
			local := w.r.IntN(2) == 0
			if local {
				// The records know the addresses; the status may not yet.
				w.in.Local = append(w.in.Local, Attachment{Pod: name, Owner: netpolnft.Owner{ContainerID: p.Name, IfName: "eth0"}, Addrs: []netip.Addr{v4, v6}})
				w.local[v4], w.local[v6] = name, name
			}
			if !p.Spec.HostNetwork && p.Status.Phase == "" && (!local || w.r.IntN(2) == 0) {
				p.Status.PodIPs = []corev1.PodIP{{IP: v4.String()}, {IP: v6.String()}}
			}
			if !p.Spec.HostNetwork && p.Status.Phase == "" {
				w.addrs = append(w.addrs, v4, v6)
			}
			if local && w.r.IntN(12) == 0 {
				continue // an attachment whose pod the agent has not seen
			}
			w.in.Pods = append(w.in.Pods, p)
		}
	}
	w.addrs = append(w.addrs, netip.MustParseAddr("192.168.7.9"), netip.MustParseAddr("10.1.0.200"),
		netip.MustParseAddr("2001:db8::9"), netip.MustParseAddr("fd00:1::ff"))
	for i := range 2 + w.r.IntN(5) {
		w.in.Policies = append(w.in.Policies, w.policy(i))
	}
	return w
}

func (w *world) someLabels() map[string]string {
	l := map[string]string{}
	for _, k := range w.labels {
		if w.r.IntN(2) == 0 {
			l[k] = []string{"1", "2"}[w.r.IntN(2)]
		}
	}
	return l
}

func (w *world) somePorts() []corev1.ContainerPort {
	var out []corev1.ContainerPort
	if w.r.IntN(2) == 0 {
		out = append(out, corev1.ContainerPort{Name: "http", ContainerPort: []int32{80, 8080}[w.r.IntN(2)]})
	}
	if w.r.IntN(3) == 0 {
		out = append(out, corev1.ContainerPort{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP})
	}
	return out
}

func (w *world) selector() *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	switch w.r.IntN(4) {
	case 0: // everything
	case 1:
		s.MatchLabels = map[string]string{w.labels[w.r.IntN(3)]: []string{"1", "2"}[w.r.IntN(2)]}
	case 2:
		s.MatchExpressions = []metav1.LabelSelectorRequirement{{Key: w.labels[w.r.IntN(3)], Operator: metav1.LabelSelectorOpExists}}
	case 3:
		s.MatchExpressions = []metav1.LabelSelectorRequirement{{Key: w.labels[w.r.IntN(3)], Operator: metav1.LabelSelectorOpNotIn, Values: []string{"1"}}}
	}
	return s
}

func (w *world) peers() []networkingv1.NetworkPolicyPeer {
	var out []networkingv1.NetworkPolicyPeer
	for range w.r.IntN(3) {
		var p networkingv1.NetworkPolicyPeer
		switch w.r.IntN(5) {
		case 0:
			p.PodSelector = w.selector()
		case 1:
			p.NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"team": []string{"x", "y"}[w.r.IntN(2)]}}
		case 2:
			p.PodSelector = w.selector()
			p.NamespaceSelector = w.selector()
			if w.r.IntN(2) == 0 {
				p.NamespaceSelector = &metav1.LabelSelector{}
			}
		case 3:
			p.IPBlock = &networkingv1.IPBlock{CIDR: "10.1.0.0/16", Except: []string{"10.1.0.0/29"}}
			if w.r.IntN(2) == 0 {
				p.IPBlock = &networkingv1.IPBlock{CIDR: "0.0.0.0/0", Except: []string{"10.1.0.0/28", "10.1.0.16/30"}}
			}
		case 4:
			p.IPBlock = &networkingv1.IPBlock{CIDR: "fd00:1::/64", Except: []string{"fd00:1::8/125"}}
			if w.r.IntN(3) == 0 {
				p.IPBlock = &networkingv1.IPBlock{CIDR: "10.1.0.0/30", Except: []string{"10.1.0.0/30"}}
			}
		}
		out = append(out, p)
	}
	return out
}

func (w *world) ports() []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	for range w.r.IntN(3) {
		var p networkingv1.NetworkPolicyPort
		switch w.r.IntN(6) {
		case 0:
			v := intstr.FromInt32(80)
			p.Port = &v
		case 1:
			v, end := intstr.FromInt32(8000), int32(8100)
			p.Port, p.EndPort = &v, &end
		case 2:
			v := intstr.FromString("http")
			p.Port = &v
		case 3:
			v := intstr.FromString("dns")
			p.Port, p.Protocol = &v, &udp
		case 4:
			p.Protocol = &udp
		case 5:
			v := intstr.FromInt32(53)
			p.Port, p.Protocol = &v, &tcp
		}
		out = append(out, p)
	}
	return out
}

func (w *world) policy(i int) *networkingv1.NetworkPolicy {
	ns := w.in.Namespaces[w.r.IntN(len(w.in.Namespaces))].Name
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("np%d", i)}}
	np.Spec.PodSelector = *w.selector()
	for range w.r.IntN(3) {
		np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: w.peers(), Ports: w.ports()})
	}
	for range w.r.IntN(3) {
		np.Spec.Egress = append(np.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: w.peers(), Ports: w.ports()})
	}
	switch w.r.IntN(4) {
	case 0:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	case 1:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	case 2:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
	}
	return np
}

var probes = []struct {
	proto uint8
	port  uint16
}{{protoTCP, 80}, {protoTCP, 8080}, {protoTCP, 8050}, {protoTCP, 53}, {protoUDP, 53}, {protoUDP, 80}, {protoSCTP, 80}, {1, 0}}

// TestCompileMatchesTheAPI: for random clusters and policies covering
// every feature, what the compiled sets let through is, for every pair
// of addresses and every probe, what the API's words allow.
func TestCompileMatchesTheAPI(t *testing.T) {
	ids := NewIdentities()
	for seed := range uint64(1000) {
		w := newWorld(seed)
		d, err := Compile(w.in, ids)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		isLocal := map[netip.Addr]bool{}
		for a := range w.local {
			isLocal[a] = true
		}
		o := oracle{in: w.in, local: w.local}
		bad := 0
		for _, src := range w.addrs {
			for _, dst := range w.addrs {
				if src == dst || src.Is4() != dst.Is4() {
					continue
				}
				for _, p := range probes {
					got, want := d.allows(isLocal, src, dst, p.proto, p.port), o.allows(src, dst, p.proto, p.port)
					if got != want {
						bad++
						if bad <= 5 {
							t.Errorf("seed %d: %s -> %s %d/%d: sets allow %v, the API %v", seed, src, dst, p.proto, p.port, got, want)
						}
					}
				}
			}
		}
		if bad > 0 {
			for _, np := range w.in.Policies {
				t.Logf("seed %d: policy %s/%s: %+v", seed, np.Namespace, np.Name, np.Spec)
			}
			t.FailNow()
		}
	}
}

// TestRulesDisjoint: no two elements of one pod overlap (the kernel's
// interval sets refuse that).
func TestRulesDisjoint(t *testing.T) {
	for seed := range uint64(300) {
		w := newWorld(seed)
		d, err := Compile(w.in, NewIdentities())
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []Rules{d.Ingress, d.Egress} {
			var blocks []BlockRule
			for e := range r.Block {
				blocks = append(blocks, e)
			}
			for i, a := range blocks {
				for _, b := range blocks[i+1:] {
					if a.Pod == b.Pod && !a.PeerHi.Less(b.PeerLo) && !b.PeerHi.Less(a.PeerLo) && overlaps(a.L4, b.L4) {
						t.Fatalf("seed %d: %+v and %+v overlap", seed, a, b)
					}
				}
			}
			var idents []IdentRule
			for e := range r.Ident {
				idents = append(idents, e)
			}
			for i, a := range idents {
				for _, b := range idents[i+1:] {
					if a.Pod == b.Pod && a.Ident == b.Ident && overlaps(a.L4, b.L4) {
						t.Fatalf("seed %d: %+v and %+v overlap", seed, a, b)
					}
				}
			}
		}
	}
}

func overlaps(a, b L4) bool {
	return a.ProtoLo <= b.ProtoHi && b.ProtoLo <= a.ProtoHi && a.PortLo <= b.PortHi && b.PortLo <= a.PortHi
}

// TestIdentitiesStable: a pod's identity number survives other pods
// coming and going, and two label sets never share one.
func TestIdentitiesStable(t *testing.T) {
	ids := NewIdentities()
	a := ids.id("red\x00app\x00web")
	b := ids.id("red\x00app\x00db")
	if a == b || a == 0 || b == 0 {
		t.Fatalf("ids %d %d", a, b)
	}
	ids.retain(map[string]bool{"red\x00app\x00web": true})
	if ids.id("red\x00app\x00web") != a {
		t.Fatal("web's identity changed")
	}
	// Collisions take the next free number.
	h := ids.id("x")
	delete(ids.byKey, "x")
	ids.byID[h], ids.byID[h+1] = "taken", "taken too"
	if got := ids.id("x"); got != h+2 {
		t.Fatalf("collision: got %d, want %d", got, h+2)
	}
}

func TestBlockRanges(t *testing.T) {
	got, err := blockRanges(&networkingv1.IPBlock{CIDR: "10.0.0.0/24", Except: []string{"10.0.0.64/26", "10.0.0.0/32"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []span{
		{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.63")},
		{netip.MustParseAddr("10.0.0.128"), netip.MustParseAddr("10.0.0.255")},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if _, err := blockRanges(&networkingv1.IPBlock{CIDR: "10.0.0/24"}); err == nil {
		t.Fatal("a bad cidr passed")
	}
	s := prefixSpan(netip.MustParsePrefix("fd00::/64"))
	if s.hi != netip.MustParseAddr("fd00::ffff:ffff:ffff:ffff") {
		t.Fatalf("v6 /64 ends at %s", s.hi)
	}
}
