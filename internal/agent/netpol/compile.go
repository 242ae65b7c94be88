// Package netpol computes Kubernetes NetworkPolicy (networking.k8s.io/v1)
// for the pods of one node as data: which of the node's pod addresses are
// isolated for ingress or egress, and what each may receive or send,
// keyed by the node's pod address. The data plane (nftables sets in
// qoscni's table, ruleset.go) looks a packet up in them with a fixed set of
// rules, so the rules a packet meets do not grow with pods or policies.
//
// Peers chosen by pod and namespace selectors are named by identity: the
// pods of one namespace with the same labels are selected by exactly the
// same selectors, so they share one number, and an allowance names the
// number, not every address (a Deployment of a hundred replicas is one
// element per port range, not a hundred). Peers chosen by ipBlock, and
// those whose allowed port is a named port of the peer, are address
// ranges.
package netpol

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/qoscni/qoscni/internal/cni/netpolnft"
)

// L4 is a range of IP protocols and one of destination ports. A rule
// without ports allows every protocol and port (AnyL4); one with ports
// names one protocol (TCP, UDP or SCTP) and a port range.
type L4 = netpolnft.L4

// AnyL4 is every protocol, every port.
var AnyL4 = netpolnft.AnyL4

const (
	protoTCP  = 6
	protoUDP  = 17
	protoSCTP = 132
)

// IdentRule allows traffic between the node's pod address Pod and the
// pods of identity Ident (from them for ingress, to them for egress).
type IdentRule struct {
	Pod   netip.Addr
	Ident uint32
	L4    L4
}

// BlockRule allows traffic between the node's pod address Pod and the
// addresses PeerLo to PeerHi (of Pod's family).
type BlockRule struct {
	Pod            netip.Addr
	PeerLo, PeerHi netip.Addr
	L4             L4
}

// Rules are one direction's allowances. Within one Pod they do not
// overlap (an nftables interval set refuses overlapping elements).
type Rules struct {
	Ident map[IdentRule]struct{}
	Block map[BlockRule]struct{}
}

// Desired is the whole state for one node.
type Desired struct {
	// Idents maps every selectable pod's address (any node's) to its
	// identity.
	Idents map[netip.Addr]uint32
	// IngressIsolated and EgressIsolated are the node's pod addresses
	// that some policy isolates in that direction: only what Ingress or
	// Egress allows passes.
	IngressIsolated, EgressIsolated map[netip.Addr]struct{}
	Ingress, Egress                 Rules
	// Ready are the node's pod addresses whose pod was known, with their
	// attachment: the rest (an attachment whose pod the agent has not
	// seen) stay pending, closed both ways.
	Ready map[netip.Addr]netpolnft.Owner
}

// State is d as the data plane takes it.
func (d *Desired) State() *netpolnft.State {
	s := &netpolnft.State{Idents: d.Idents, IngressIsolated: d.IngressIsolated, EgressIsolated: d.EgressIsolated, Ready: d.Ready}
	for _, r := range []struct {
		rules Rules
		ident *[]netpolnft.IdentAllow
		block *[]netpolnft.BlockAllow
	}{{d.Ingress, &s.IngressIdent, &s.IngressBlock}, {d.Egress, &s.EgressIdent, &s.EgressBlock}} {
		for e := range r.rules.Ident {
			*r.ident = append(*r.ident, netpolnft.IdentAllow{Pod: e.Pod, Ident: e.Ident, L4: e.L4})
		}
		for e := range r.rules.Block {
			*r.block = append(*r.block, netpolnft.BlockAllow{Pod: e.Pod, PeerLo: e.PeerLo, PeerHi: e.PeerHi, L4: e.L4})
		}
	}
	return s
}

// Attachment is one of the node's pod interfaces, from its record.
type Attachment struct {
	Pod   types.NamespacedName
	Owner netpolnft.Owner
	Addrs []netip.Addr
}

// Input is what the agent's informers and the node's records hold.
type Input struct {
	Policies   []*networkingv1.NetworkPolicy
	Pods       []*corev1.Pod // every node's
	Namespaces []*corev1.Namespace
	// Local are the node's attachments: the records know their addresses
	// before the pod's status does.
	Local []Attachment
}

// Identities numbers peer identities. A number stays with its identity
// while the identity is in use, across compilations, so that a change
// rewrites only the elements it concerns.
type Identities struct {
	byKey map[string]uint32
	byID  map[uint32]string
}

// NewIdentities returns an empty numbering.
func NewIdentities() *Identities {
	return &Identities{byKey: map[string]uint32{}, byID: map[uint32]string{}}
}

// id is key's number: a hash of it, the next free number on a collision.
func (ids *Identities) id(key string) uint32 {
	if id, ok := ids.byKey[key]; ok {
		return id
	}
	h := fnv.New32a()
	h.Write([]byte(key))
	id := h.Sum32()
	for {
		if _, taken := ids.byID[id]; !taken && id != 0 {
			break
		}
		id++
	}
	ids.byKey[key] = id
	ids.byID[id] = key
	return id
}

// retain forgets the identities not in used.
func (ids *Identities) retain(used map[string]bool) {
	for k, id := range ids.byKey {
		if !used[k] {
			delete(ids.byKey, k)
			delete(ids.byID, id)
		}
	}
}

// identityKey is what selectors can tell pods apart by: the namespace
// (its labels are the namespace's) and the pod's labels.
func identityKey(p *corev1.Pod) string {
	keys := make([]string, 0, len(p.Labels))
	for k := range p.Labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(p.Namespace)
	for _, k := range keys {
		// Label keys and values cannot hold NUL.
		b.WriteString("\x00" + k + "\x00" + p.Labels[k])
	}
	return b.String()
}

// peer is one pod that selectors may choose.
type peer struct {
	pod   *corev1.Pod
	ident uint32
	addrs []netip.Addr
}

// compiler holds one compilation's indexes, and what it computed once
// for all the node's pods: a policy's pod selector, and the pods and
// identities a peer of a rule chooses (the same for every pod the policy
// selects; the objects do not change during a compilation).
type compiler struct {
	nsLabels map[string]labels.Set
	peers    []*peer
	byNs     map[string][]*peer
	policies map[string][]*networkingv1.NetworkPolicy // by namespace
	out      *Desired
	ingress  *builder
	egress   *builder

	podSelectors map[*networkingv1.NetworkPolicy]labels.Selector
	chosen       map[*networkingv1.NetworkPolicyPeer]*chosenPeers
}

// chosenPeers are the pods a peer selects and their identities.
type chosenPeers struct {
	pods   []*peer
	idents []uint32
}

// Compile computes the node's desired state. ids keeps identity numbers
// from one compilation to the next.
func Compile(in Input, ids *Identities) (*Desired, error) {
	c := &compiler{
		nsLabels: map[string]labels.Set{},
		byNs:     map[string][]*peer{},
		policies: map[string][]*networkingv1.NetworkPolicy{},
		out: &Desired{
			Idents:          map[netip.Addr]uint32{},
			IngressIsolated: map[netip.Addr]struct{}{},
			EgressIsolated:  map[netip.Addr]struct{}{},
			Ready:           map[netip.Addr]netpolnft.Owner{},
		},
		ingress:      newBuilder(),
		egress:       newBuilder(),
		podSelectors: map[*networkingv1.NetworkPolicy]labels.Selector{},
		chosen:       map[*networkingv1.NetworkPolicyPeer]*chosenPeers{},
	}
	for _, ns := range in.Namespaces {
		c.nsLabels[ns.Name] = labels.Set(ns.Labels)
	}
	for _, np := range in.Policies {
		c.policies[np.Namespace] = append(c.policies[np.Namespace], np)
	}
	recorded := map[types.NamespacedName][]netip.Addr{}
	for _, a := range in.Local {
		recorded[a.Pod] = append(recorded[a.Pod], a.Addrs...)
	}
	used := map[string]bool{}
	local := map[types.NamespacedName]*peer{}
	for _, p := range in.Pods {
		if p.Spec.HostNetwork || terminal(p) {
			continue
		}
		name := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
		addrs := podAddrs(p, recorded[name])
		key := identityKey(p)
		used[key] = true
		pe := &peer{pod: p, ident: ids.id(key), addrs: addrs}
		c.peers = append(c.peers, pe)
		c.byNs[p.Namespace] = append(c.byNs[p.Namespace], pe)
		for _, a := range addrs {
			c.out.Idents[a] = pe.ident
		}
		if _, ok := recorded[name]; ok {
			local[name] = pe
		}
	}
	ids.retain(used)
	for _, at := range in.Local {
		pe := local[at.Pod]
		if pe == nil {
			// Not seen yet, finished, or gone from the API while its
			// sandbox lives: closed both ways (and still pending if it
			// was), never open because its policies are unknown.
			for _, a := range at.Addrs {
				c.out.IngressIsolated[a.Unmap()] = struct{}{}
				c.out.EgressIsolated[a.Unmap()] = struct{}{}
			}
			continue
		}
		if err := c.local(pe, at.Addrs); err != nil {
			return nil, fmt.Errorf("policies of pod %s: %w", at.Pod, err)
		}
		for _, a := range at.Addrs {
			c.out.Ready[a.Unmap()] = at.Owner
		}
	}
	c.out.Ingress = c.ingress.rules()
	c.out.Egress = c.egress.rules()
	return c.out, nil
}

// terminal pods hold no address any more (it may be another pod's).
func terminal(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// podAddrs are the pod's addresses: its status's and the records'.
func podAddrs(p *corev1.Pod, recorded []netip.Addr) []netip.Addr {
	var out []netip.Addr
	add := func(a netip.Addr) {
		a = a.Unmap()
		if a.IsValid() && !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	for _, a := range recorded {
		add(a)
	}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			add(a)
		}
	}
	if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
		add(a)
	}
	return out
}

// local computes the policies of one of the node's pods.
func (c *compiler) local(pe *peer, addrs []netip.Addr) error {
	var ingress, egress bool
	for _, np := range c.policies[pe.pod.Namespace] {
		sel, ok := c.podSelectors[np]
		if !ok {
			var err error
			if sel, err = metav1.LabelSelectorAsSelector(&np.Spec.PodSelector); err != nil {
				return fmt.Errorf("networkpolicy %s/%s: spec.podSelector: %w", np.Namespace, np.Name, err)
			}
			c.podSelectors[np] = sel
		}
		if !sel.Matches(labels.Set(pe.pod.Labels)) {
			continue
		}
		in, eg := policyTypes(np)
		if in {
			ingress = true
			for i, r := range np.Spec.Ingress {
				if err := c.rule(pe, addrs, np, r.From, r.Ports, c.ingress, false); err != nil {
					return fmt.Errorf("networkpolicy %s/%s: spec.ingress[%d]: %w", np.Namespace, np.Name, i, err)
				}
			}
		}
		if eg {
			egress = true
			for i, r := range np.Spec.Egress {
				if err := c.rule(pe, addrs, np, r.To, r.Ports, c.egress, true); err != nil {
					return fmt.Errorf("networkpolicy %s/%s: spec.egress[%d]: %w", np.Namespace, np.Name, i, err)
				}
			}
		}
	}
	for _, a := range addrs {
		a = a.Unmap()
		if ingress {
			c.out.IngressIsolated[a] = struct{}{}
		}
		if egress {
			c.out.EgressIsolated[a] = struct{}{}
		}
	}
	return nil
}

// policyTypes are the directions np isolates: its policyTypes, or by
// default ingress, and egress when it has egress rules.
func policyTypes(np *networkingv1.NetworkPolicy) (ingress, egress bool) {
	if len(np.Spec.PolicyTypes) == 0 {
		return true, len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		}
	}
	return ingress, egress
}

// portSpec is one entry of a rule's ports, with a named port left to
// resolve on the pod that receives the traffic.
type portSpec struct {
	proto uint8
	named string
	l4    L4
}

func parsePorts(ports []networkingv1.NetworkPolicyPort) ([]portSpec, error) {
	if len(ports) == 0 {
		return []portSpec{{l4: AnyL4}}, nil
	}
	var out []portSpec
	for i, p := range ports {
		proto := uint8(protoTCP)
		if p.Protocol != nil {
			switch *p.Protocol {
			case corev1.ProtocolTCP:
			case corev1.ProtocolUDP:
				proto = protoUDP
			case corev1.ProtocolSCTP:
				proto = protoSCTP
			default:
				return nil, fmt.Errorf("ports[%d].protocol: %q is not TCP, UDP or SCTP", i, *p.Protocol)
			}
		}
		s := portSpec{proto: proto, l4: L4{ProtoLo: proto, ProtoHi: proto, PortLo: 0, PortHi: 65535}}
		switch {
		case p.Port == nil:
		case p.Port.Type == intstr.String: // a named port
			s.named = p.Port.StrVal
		default:
			v := p.Port.IntVal
			if v < 1 || v > 65535 {
				return nil, fmt.Errorf("ports[%d].port: %d is not a port", i, v)
			}
			s.l4.PortLo, s.l4.PortHi = uint16(v), uint16(v)
			if p.EndPort != nil {
				if *p.EndPort < v || *p.EndPort > 65535 {
					return nil, fmt.Errorf("ports[%d].endPort: %d is not a port at or above %d", i, *p.EndPort, v)
				}
				s.l4.PortHi = uint16(*p.EndPort)
			}
		}
		out = append(out, s)
	}
	return out, nil
}

// resolve is s on pod p, the pod receiving the traffic: a named port is
// the number of p's container port of that name and protocol, and
// nothing when p has none.
func (s portSpec) resolve(p *corev1.Pod) (L4, bool) {
	if s.named == "" {
		return s.l4, true
	}
	if p == nil {
		return L4{}, false
	}
	for _, ct := range p.Spec.Containers {
		for _, cp := range ct.Ports {
			proto := corev1.ProtocolTCP
			if cp.Protocol != "" {
				proto = cp.Protocol
			}
			if cp.Name == s.named && protoNumber(proto) == s.proto && cp.ContainerPort > 0 && cp.ContainerPort <= 65535 {
				port := uint16(cp.ContainerPort)
				return L4{ProtoLo: s.proto, ProtoHi: s.proto, PortLo: port, PortHi: port}, true
			}
		}
	}
	return L4{}, false
}

func protoNumber(p corev1.Protocol) uint8 {
	switch p {
	case corev1.ProtocolTCP:
		return protoTCP
	case corev1.ProtocolUDP:
		return protoUDP
	case corev1.ProtocolSCTP:
		return protoSCTP
	}
	return 0
}

// rule adds one ingress (egress false) or egress rule of np for the
// node's pod pe: peers are its from (or to), ports its ports.
func (c *compiler) rule(pe *peer, addrs []netip.Addr, np *networkingv1.NetworkPolicy, peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort, b *builder, egress bool) error {
	specs, err := parsePorts(ports)
	if err != nil {
		return err
	}
	// Ingress: the port is the node's pod's, resolved once. Egress: each
	// peer's, resolved per peer (then the peer is named by address).
	var fixed []L4       // resolved without a peer
	var named []portSpec // egress named ports
	for _, s := range specs {
		switch {
		case s.named == "":
			fixed = append(fixed, s.l4)
		case !egress:
			if l4, ok := s.resolve(pe.pod); ok {
				fixed = append(fixed, l4)
			}
		default:
			named = append(named, s)
		}
	}
	if len(peers) == 0 {
		// Every source (destination): every address, and for egress
		// named ports, every pod that has one.
		for _, a := range addrs {
			lo, hi := fullRange(a)
			for _, l4 := range fixed {
				b.block(a, lo, hi, l4)
			}
		}
		if len(named) > 0 {
			c.namedTo(addrs, c.peers, named, b, nil)
		}
		return nil
	}
	for i := range peers {
		p := &peers[i]
		if p.IPBlock != nil {
			ranges, err := blockRanges(p.IPBlock)
			if err != nil {
				return fmt.Errorf("from/to[%d].ipBlock: %w", i, err)
			}
			if ranges == nil {
				ranges = []span{} // all excepted: not "anywhere"
			}
			for _, a := range addrs {
				for _, r := range ranges {
					if r.lo.Is4() != a.Is4() {
						continue
					}
					for _, l4 := range fixed {
						b.block(a, r.lo, r.hi, l4)
					}
				}
			}
			if len(named) > 0 {
				// A named port is a pod's: the pods inside the block.
				c.namedTo(addrs, c.peers, named, b, ranges)
			}
			continue
		}
		chosen, err := c.selected(np.Namespace, p)
		if err != nil {
			return fmt.Errorf("from/to[%d]: %w", i, err)
		}
		for _, a := range addrs {
			for _, id := range chosen.idents {
				for _, l4 := range fixed {
					b.ident(a, id, l4)
				}
			}
		}
		if len(named) > 0 {
			c.namedTo(addrs, chosen.pods, named, b, nil)
		}
	}
	return nil
}

// namedTo allows egress from addrs to each of peers on its own named
// ports; with within not nil, only to peer addresses inside one of
// those ranges (an ipBlock's, none when its excepts cover it all).
func (c *compiler) namedTo(addrs []netip.Addr, peers []*peer, named []portSpec, b *builder, within []span) {
	inside := func(a netip.Addr) bool {
		if within == nil {
			return true
		}
		for _, r := range within {
			if r.lo.Is4() == a.Is4() && !a.Less(r.lo) && !r.hi.Less(a) {
				return true
			}
		}
		return false
	}
	for _, q := range peers {
		for _, s := range named {
			l4, ok := s.resolve(q.pod)
			if !ok {
				continue
			}
			for _, a := range addrs {
				for _, qa := range q.addrs {
					if qa.Is4() == a.Is4() && inside(qa) {
						b.block(a, qa, qa, l4)
					}
				}
			}
		}
	}
}

// selectPeers are the pods a peer with selectors chooses, for a policy
// of namespace ns.
// selected is selectPeers of a rule's peer, once per compilation.
func (c *compiler) selected(ns string, p *networkingv1.NetworkPolicyPeer) (*chosenPeers, error) {
	if ch, ok := c.chosen[p]; ok {
		return ch, nil
	}
	pods, err := c.selectPeers(ns, *p)
	if err != nil {
		return nil, err
	}
	ch := &chosenPeers{pods: pods}
	seen := map[uint32]bool{}
	for _, q := range pods {
		if !seen[q.ident] {
			seen[q.ident] = true
			ch.idents = append(ch.idents, q.ident)
		}
	}
	c.chosen[p] = ch
	return ch, nil
}

func (c *compiler) selectPeers(ns string, p networkingv1.NetworkPolicyPeer) ([]*peer, error) {
	var podSel labels.Selector = labels.Everything()
	if p.PodSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(p.PodSelector)
		if err != nil {
			return nil, fmt.Errorf("podSelector: %w", err)
		}
		podSel = s
	}
	var spaces []string
	if p.NamespaceSelector == nil {
		spaces = []string{ns}
	} else {
		s, err := metav1.LabelSelectorAsSelector(p.NamespaceSelector)
		if err != nil {
			return nil, fmt.Errorf("namespaceSelector: %w", err)
		}
		for name := range c.byNs {
			if s.Matches(c.nsLabelsOf(name)) {
				spaces = append(spaces, name)
			}
		}
	}
	var out []*peer
	for _, name := range spaces {
		for _, q := range c.byNs[name] {
			if podSel.Matches(labels.Set(q.pod.Labels)) {
				out = append(out, q)
			}
		}
	}
	return out, nil
}

// nsLabelsOf are a namespace's labels; one the informer has not seen
// has at least the name label the API server gives every namespace.
func (c *compiler) nsLabelsOf(name string) labels.Set {
	if l, ok := c.nsLabels[name]; ok {
		return l
	}
	return labels.Set{corev1.LabelMetadataName: name}
}
