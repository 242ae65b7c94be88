package nodenet

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol marks the routes qoscni owns (rtm_protocol, "proto 81" in
// ip route). Listing by protocol is what lets the reconciler delete its
// stale routes without ever touching a route someone else made. 81 (0x51,
// "Q") is outside the values iproute2's rt_protos reserves (0-4 kernel,
// 8-18 routing daemons, 42 babel, 99 openr, 186-192) and is not the
// protocol of the well-known CNIs (Calico uses 80, BIRD 12).
const RouteProtocol netlink.RouteProtocol = 0x51

// Mode selects how routes to the other nodes' pods are made.
type Mode string

const (
	// ModeOff installs no routes (another component routes pod CIDRs).
	ModeOff Mode = "off"
	// ModeHostGW routes each peer's pod CIDRs via its InternalIP; peers
	// not on this node's L2 segment are skipped.
	ModeHostGW Mode = "hostgw"
	// ModeVXLAN routes every peer's pod CIDRs through the qoscni VXLAN
	// device (VXLANDevice), on-link or not.
	ModeVXLAN Mode = "vxlan"
	// ModeAuto picks per pod CIDR: host-gw when the peer's InternalIP is
	// on-link, VXLAN when it is behind a router (ReasonNotOnLink).
	ModeAuto Mode = "auto"
)

// ParseMode checks a --pod-routes value ("" = off).
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case "", ModeOff:
		return ModeOff, nil
	case ModeHostGW, ModeVXLAN, ModeAuto:
		return Mode(s), nil
	}
	return "", fmt.Errorf("pod routes mode %q: want off, hostgw, vxlan or auto", s)
}

// Route is one desired route: the pods of Peer, via its address (host-gw),
// or, when VXLAN is set, via the peer's gateway address (the first address
// of Dst) on-link on the VXLAN device, whose neighbour entry is the peer's
// VTEP MAC and whose FDB sends that MAC to Underlay.
type Route struct {
	Peer string
	Dst  *net.IPNet
	Via  net.IP
	// VXLAN routes only.
	VXLAN    bool
	Underlay net.IP           // the peer's IPv4 InternalIP: the outer destination
	MAC      net.HardwareAddr // the peer's VTEP MAC
}

func (r Route) String() string {
	if r.VXLAN {
		return fmt.Sprintf("%s via %s dev %s (node %s, vtep %s at %s)", r.Dst, r.Via, VXLANDevice, r.Peer, r.MAC, r.Underlay)
	}
	return fmt.Sprintf("%s via %s (node %s)", r.Dst, r.Via, r.Peer)
}

// Why a peer's pod CIDR got no route.
const (
	ReasonNoAddress   = "NoInternalIP"   // no InternalIP of the CIDR's family
	ReasonNotOnLink   = "NotOnLink"      // the InternalIP is behind a router: host-gw impossible
	ReasonConflict    = "CIDRConflict"   // the CIDR overlaps this node's or another peer's
	ReasonForeignHeld = "ForeignRoute"   // a route not made by qoscni holds the destination
	ReasonSelfAddress = "OwnInternalIP"  // the peer's InternalIP is an address of this node
	ReasonNoRoute     = "NoRouteToPeer"  // the kernel has no route to the InternalIP at all
	ReasonNoVTEP      = "NoVTEPMAC"      // VXLAN wanted, the peer publishes no VTEP MAC (yet)
	ReasonNoUnderlay  = "NoIPv4Underlay" // VXLAN wanted, this node or the peer has no usable IPv4 InternalIP
)

// Skipped is a pod CIDR left without a route, with the reason.
type Skipped struct {
	Peer   string
	Dst    *net.IPNet
	Reason string
	Detail string
}

func (s Skipped) String() string {
	return fmt.Sprintf("%s of node %s: %s: %s", s.Dst, s.Peer, s.Reason, s.Detail)
}

// OnLink tells whether ip can be a host-gw gateway; when not, why.
type OnLink func(ip net.IP) (ok bool, reason, detail string)

// Desired computes the host-gw routes of this node (self) to its peers:
// for every other peer and each of its pod CIDRs, a route via the first
// InternalIP of the same family that onLink accepts. When CIDRs of peers
// overlap, the peer first by name keeps its CIDR and the others are
// skipped, so every node decides alike; a CIDR overlapping one of self's
// own is never routed away. Routes come sorted by destination, skipped
// CIDRs by peer.
func Desired(self string, peers []Peer, onLink OnLink) ([]Route, []Skipped) {
	pl := DesiredMode(self, peers, ModeHostGW, onLink)
	return pl.Routes, pl.Skipped
}

// Plan is the desired state of one mode.
type Plan struct {
	Routes  []Route
	Skipped []Skipped
	// NeedVTEP: some pod CIDR wants VXLAN (routed or waiting for the
	// peer's VTEP MAC), so this node's VXLAN device must exist and its
	// MAC be published. Local is its underlay address.
	NeedVTEP bool
	Local    net.IP
}

// DesiredMode is Desired for any routing mode. VXLAN routes need this
// node's IPv4 InternalIP (the VTEP's local address: IPv6 pod CIDRs ride
// the IPv4 underlay too), the peer's IPv4 InternalIP that the kernel can
// reach (directly or via a router) and the peer's VTEP MAC.
func DesiredMode(self string, peers []Peer, mode Mode, onLink OnLink) Plan {
	sorted := slices.Clone(peers)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	pp := &planner{mode: mode, onLink: onLink}
	cands := pp.candidates(self, sorted)
	pp.skipped = append(pp.skipped, resolveOverlaps(cands)...)
	for _, c := range cands {
		if !c.lost {
			pp.place(c)
		}
	}
	slices.SortFunc(pp.routes, func(a, b Route) int { return compareNet(a.Dst, b.Dst) })
	slices.SortStableFunc(pp.skipped, func(a, b Skipped) int {
		if c := strings.Compare(a.Peer, b.Peer); c != 0 {
			return c
		}
		return compareNet(a.Dst, b.Dst)
	})
	pp.pl.Routes, pp.pl.Skipped = pp.routes, pp.skipped
	return pp.pl
}

// planner collects one DesiredMode call's routes and skipped CIDRs.
type planner struct {
	mode    Mode
	onLink  OnLink
	pl      Plan
	routes  []Route
	skipped []Skipped
}

// candidates finds this node's underlay address and pod CIDRs, and lists
// the other nodes' pod CIDRs that do not overlap its own.
func (pp *planner) candidates(self string, sorted []Peer) []candidate {
	var own []*net.IPNet
	for _, p := range sorted {
		if p.Name != self {
			continue
		}
		own = append(own, p.PodCIDRs...)
		if pp.pl.Local != nil {
			continue
		}
		for _, ip := range p.InternalIPs {
			if isV4(ip) {
				pp.pl.Local = ip
				break
			}
		}
	}
	var cands []candidate
	for i := range sorted {
		p := &sorted[i]
		if p.Name == self {
			continue
		}
	cidrs:
		for _, dst := range p.PodCIDRs {
			for _, o := range own {
				if overlap(o, dst) {
					pp.skipped = append(pp.skipped, Skipped{p.Name, dst, ReasonConflict, fmt.Sprintf("overlaps this node's pod CIDR %s", o)})
					continue cidrs
				}
			}
			cands = append(cands, newCandidate(len(cands), p, dst))
		}
	}
	return cands
}

// place routes one pod CIDR: directly to an on-link InternalIP of its
// family, or over VXLAN (mode vxlan, or auto for a peer behind a router).
func (pp *planner) place(c candidate) {
	if pp.mode == ModeVXLAN || (pp.mode == ModeAuto && pp.behindRouter(c.peer)) {
		pp.vxlan(c)
		return
	}
	v4 := isV4(c.dst.IP)
	var reason, detail string
	for _, ip := range c.peer.InternalIPs {
		if isV4(ip) != v4 {
			continue
		}
		ok, why, more := pp.onLink(ip)
		if ok {
			pp.routes = append(pp.routes, Route{Peer: c.peer.Name, Dst: c.dst, Via: ip})
			return
		}
		if reason == "" {
			reason, detail = why, more
		}
	}
	if reason == ReasonNotOnLink && pp.mode == ModeAuto {
		pp.vxlan(c)
		return
	}
	if reason == "" {
		reason, detail = ReasonNoAddress, "the node has no "+familyName(v4)+" InternalIP"
	}
	pp.skipped = append(pp.skipped, Skipped{c.peer.Name, c.dst, reason, detail})
}

// vxlan routes a pod CIDR through the VXLAN device to the peer's VTEP.
func (pp *planner) vxlan(c candidate) {
	pp.pl.NeedVTEP = true
	if pp.pl.Local == nil {
		pp.skipped = append(pp.skipped, Skipped{c.peer.Name, c.dst, ReasonNoUnderlay, "this node has no IPv4 InternalIP for the VXLAN underlay"})
		return
	}
	var under net.IP
	for _, ip := range c.peer.InternalIPs {
		if !isV4(ip) {
			continue
		}
		if ok, why, _ := pp.onLink(ip); ok || why == ReasonNotOnLink {
			under = ip
			break
		}
	}
	switch {
	case under == nil:
		pp.skipped = append(pp.skipped, Skipped{c.peer.Name, c.dst, ReasonNoUnderlay, "the node has no reachable IPv4 InternalIP for the VXLAN underlay"})
	case c.peer.VTEPMAC == nil:
		pp.skipped = append(pp.skipped, Skipped{c.peer.Name, c.dst, ReasonNoVTEP, "the node has no " + VTEPMACAnnotation + " annotation (yet): its agent is not in mode vxlan/auto or has not started"})
	default:
		pp.routes = append(pp.routes, Route{Peer: c.peer.Name, Dst: c.dst, Via: net.IP(slices.Clone(c.lo)), VXLAN: true, Underlay: under, MAC: c.peer.VTEPMAC})
	}
}

// behindRouter: the peer's IPv4 underlay is reachable only through a
// router. Mode auto then takes VXLAN for all its pod CIDRs (per peer:
// also an IPv6 CIDR of a peer without an IPv6 InternalIP).
func (pp *planner) behindRouter(p *Peer) bool {
	routed := false
	for _, ip := range p.InternalIPs {
		if !isV4(ip) {
			continue
		}
		ok, why, _ := pp.onLink(ip)
		if ok {
			return false
		}
		routed = routed || why == ReasonNotOnLink
	}
	return routed
}

// compareNet orders IPv4 before IPv6, then by address and prefix length
// (no strings: thousands of routes are sorted on every pass).
func compareNet(a, b *net.IPNet) int {
	x, y := normIP(a.IP), normIP(b.IP)
	if len(x) != len(y) {
		return len(x) - len(y)
	}
	if c := bytes.Compare(x, y); c != 0 {
		return c
	}
	la, _ := a.Mask.Size()
	lb, _ := b.Mask.Size()
	return la - lb
}

// candidate is a peer's pod CIDR before conflicts are settled; order is
// its rank by peer name.
type candidate struct {
	order    int
	peer     *Peer
	dst      *net.IPNet
	lo, last []byte // first and last address
	lost     bool
}

func newCandidate(order int, p *Peer, dst *net.IPNet) candidate {
	lo := normIP(dst.IP.Mask(dst.Mask))
	mask := dst.Mask
	if len(mask) != len(lo) {
		mask = mask[len(mask)-len(lo):]
	}
	last := make([]byte, len(lo))
	for i := range lo {
		last[i] = lo[i] | ^mask[i]
	}
	return candidate{order: order, peer: p, dst: dst, lo: lo, last: last}
}

// resolveOverlaps marks the losers of overlapping CIDRs. Sorted by first
// address, only CIDRs in one run of overlapping intervals can conflict,
// and such runs are rare (a misconfiguration), so a cluster of thousands
// of nodes costs a sort, not a comparison of every pair.
func resolveOverlaps(cands []candidate) []Skipped {
	idx := make([]int, len(cands))
	for i := range idx {
		idx[i] = i
	}
	key := func(i int) []byte { return cands[i].lo }
	sort.Slice(idx, func(a, b int) bool {
		x, y := key(idx[a]), key(idx[b])
		if len(x) != len(y) {
			return len(x) < len(y)
		}
		return bytes.Compare(x, y) < 0
	})
	var skipped []Skipped
	for start := 0; start < len(idx); {
		end, maxLast := start+1, cands[idx[start]].last
		for end < len(idx) {
			c := cands[idx[end]]
			if len(c.lo) != len(maxLast) || bytes.Compare(c.lo, maxLast) > 0 {
				break
			}
			if bytes.Compare(c.last, maxLast) > 0 {
				maxLast = c.last
			}
			end++
		}
		if end-start > 1 {
			group := slices.Clone(idx[start:end])
			slices.Sort(group) // by peer name
			var won []int
			for _, i := range group {
				c := &cands[i]
				w := slices.IndexFunc(won, func(j int) bool { return overlap(cands[j].dst, c.dst) })
				if w < 0 {
					won = append(won, i)
					continue
				}
				c.lost = true
				o := cands[won[w]]
				skipped = append(skipped, Skipped{c.peer.Name, c.dst, ReasonConflict, fmt.Sprintf("overlaps %s of node %s", o.dst, o.peer.Name)})
			}
		}
		start = end
	}
	return skipped
}

func overlap(a, b *net.IPNet) bool { return a.Contains(b.IP) || b.Contains(a.IP) }

// Routes reconciles the kernel's routes to the pods of other nodes in one
// network namespace (the node's), through a netlink handle of the caller.
// It is not safe for concurrent use; the Watcher calls it from one
// goroutine.
type Routes struct {
	h    *netlink.Handle
	self string
	mode Mode
}

// NewRoutes reconciles host-gw routes through h for the node named self.
func NewRoutes(h *netlink.Handle, self string) *Routes { return NewRoutesMode(h, self, ModeHostGW) }

// NewRoutesMode reconciles the routes of mode (hostgw, vxlan or auto).
func NewRoutesMode(h *netlink.Handle, self string, mode Mode) *Routes {
	return &Routes{h: h, self: self, mode: mode}
}

// Result says what one pass found and did.
type Result struct {
	Desired  []Route
	Skipped  []Skipped
	Added    int
	Replaced int
	Deleted  int
	// Installed is the number of qoscni routes in the kernel after the pass.
	Installed int
	// VXLAN: the device's MAC when it exists after the pass (to publish),
	// its MTU, whether this pass created it, and the neighbour and FDB
	// entries changed (added, replaced or deleted).
	VTEPMAC     net.HardwareAddr
	VTEPMTU     int
	VTEPCreated bool
	NeighFDB    int
}

// Reconcile makes the qoscni routes of the main table exactly the desired
// ones for peers: it adds the missing, replaces those whose gateway
// changed and deletes those no peer wants any more. Routes of any other
// protocol are not changed; one holding a desired destination makes that
// CIDR Skipped (ReasonForeignHeld). Errors of single routes do not stop
// the pass; they are returned joined.
func (r *Routes) Reconcile(peers []Peer) (Result, error) {
	var res Result
	pl := DesiredMode(r.self, peers, r.mode, r.onLinkCached())
	res.Desired, res.Skipped = pl.Routes, pl.Skipped
	var errs []error
	vxIndex := 0
	if r.mode == ModeVXLAN || r.mode == ModeAuto {
		var err error
		vxIndex, err = r.vtep(pl, &res)
		if err != nil {
			errs = append(errs, err)
		}
		if vxIndex == 0 {
			// No device: VXLAN routes cannot be made; the host-gw ones can.
			res.Desired = slices.DeleteFunc(res.Desired, func(rt Route) bool {
				if rt.VXLAN {
					res.Skipped = append(res.Skipped, Skipped{rt.Peer, rt.Dst, ReasonNoUnderlay, "this node's VXLAN device is not usable"})
				}
				return rt.VXLAN
			})
		}
	}
	have, err := r.List()
	if err != nil {
		return res, errors.Join(append(errs, err)...)
	}
	byDst := map[string][]netlink.Route{}
	for _, rt := range have {
		if rt.Dst != nil {
			byDst[rt.Dst.String()] = append(byDst[rt.Dst.String()], rt)
		}
	}
	installed := 0
	for _, want := range res.Desired {
		key := want.Dst.String()
		n, err := r.converge(want, byDst[key], vxIndex, &res)
		delete(byDst, key)
		installed += n
		errs = append(errs, err...)
	}
	// What is left of ours routes to no pod CIDR any more.
	dsts := make([]string, 0, len(byDst))
	for k := range byDst {
		dsts = append(dsts, k)
	}
	sort.Strings(dsts)
	for _, k := range dsts {
		for _, rt := range byDst[k] {
			if err := r.del(rt); err != nil {
				errs = append(errs, err)
				installed++
				continue
			}
			res.Deleted++
		}
	}
	res.Installed = installed
	if vxIndex != 0 {
		n, err := r.reconcileNeighFDB(vxIndex, res.Desired)
		res.NeighFDB = n
		if err != nil {
			errs = append(errs, err)
		}
	}
	return res, errors.Join(errs...)
}

// converge makes the routes of ours to want's destination (cur) exactly
// want, and returns how many routes of ours to it remain installed.
func (r *Routes) converge(want Route, cur []netlink.Route, vxIndex int, res *Result) (int, []error) {
	var errs []error
	installed := 0
	spec := r.spec(want, vxIndex)
	keep := slices.IndexFunc(cur, func(rt netlink.Route) bool { return matches(rt, want, vxIndex) })
	switch {
	case keep >= 0:
		installed++
	case len(cur) > 0:
		// Ours, pointing elsewhere (the peer's address changed, or
		// edited by hand): replace in place, no window without a route.
		if err := r.h.RouteReplace(spec); err != nil {
			return installed, []error{fmt.Errorf("replace route %s: %w", want, err)}
		}
		res.Replaced++
		installed++
		keep = slices.IndexFunc(cur, func(rt netlink.Route) bool { return rt.Priority == effectivePriority(spec) })
	default:
		// RouteAdd, not replace: a route someone else made for this
		// destination must fail the add, not be overwritten.
		err := r.h.RouteAdd(spec)
		if errors.Is(err, unix.EEXIST) {
			res.Skipped = append(res.Skipped, Skipped{want.Peer, want.Dst, ReasonForeignHeld, r.foreignDetail(want.Dst)})
			return installed, nil
		}
		if err != nil {
			return installed, []error{fmt.Errorf("add route %s: %w", want, err)}
		}
		res.Added++
		installed++
	}
	// Other routes of ours to the same destination (another metric):
	// leftovers that would shadow or back up the right one.
	for i, rt := range cur {
		if i == keep {
			continue
		}
		if err := r.del(rt); err != nil {
			errs = append(errs, err)
			installed++
			continue
		}
		res.Deleted++
	}
	return installed, errs
}

func (r *Routes) del(rt netlink.Route) error {
	err := r.h.RouteDel(&rt)
	if err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("delete route %s via %s: %w", rt.Dst, rt.Gw, err)
	}
	return nil
}

func (r *Routes) spec(w Route, vxIndex int) *netlink.Route {
	fam := unix.AF_INET6
	if isV4(w.Dst.IP) {
		fam = unix.AF_INET
	}
	rt := &netlink.Route{
		Dst: w.Dst, Gw: w.Via, Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN,
		Type: unix.RTN_UNICAST, Family: fam,
	}
	if w.VXLAN {
		// onlink: the gateway is no address of any prefix on the device;
		// its permanent neighbour entry makes it the peer's VTEP MAC.
		rt.LinkIndex = vxIndex
		rt.Flags = int(netlink.FLAG_ONLINK)
	}
	return rt
}

// effectivePriority is the metric the kernel gives a route added with
// none: 0 for IPv4, 1024 for IPv6.
func effectivePriority(rt *netlink.Route) int {
	if rt.Priority == 0 && rt.Family == unix.AF_INET6 {
		return 1024
	}
	return rt.Priority
}

func matches(rt netlink.Route, w Route, vxIndex int) bool {
	if w.VXLAN && (rt.LinkIndex != vxIndex || rt.Flags&int(netlink.FLAG_ONLINK) == 0) {
		return false
	}
	return rt.Gw.Equal(w.Via) && len(rt.MultiPath) == 0 && rt.Encap == nil &&
		rt.Type == unix.RTN_UNICAST && rt.Table == unix.RT_TABLE_MAIN
}

// List returns the routes qoscni owns in the main table, both families.
func (r *Routes) List() ([]netlink.Route, error) {
	filter := &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}
	var err error
	for range 3 {
		var rts []netlink.Route
		rts, err = r.h.RouteListFiltered(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err == nil {
			return rts, nil
		}
		// A dump interrupted by a concurrent change may miss routes:
		// deleting from it could remove a route that exists. Retry.
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, fmt.Errorf("list qoscni routes: %w", err)
}

// onLinkCached answers OnLink from the kernel's route lookup, once per
// address per pass.
func (r *Routes) onLinkCached() OnLink {
	type answer struct {
		ok             bool
		reason, detail string
	}
	cache := map[string]answer{}
	return func(ip net.IP) (bool, string, string) {
		k := ip.String()
		if a, ok := cache[k]; ok {
			return a.ok, a.reason, a.detail
		}
		var a answer
		a.ok, a.reason, a.detail = r.onLink(ip)
		cache[k] = a
		return a.ok, a.reason, a.detail
	}
}

// onLink: host-gw needs the peer on a connected network, that is the
// kernel reaches it without a gateway. (A route lookup rather than a scan
// of connected prefixes: it honours a more specific route via a router
// inside a connected prefix, and policy routing.)
func (r *Routes) onLink(ip net.IP) (bool, string, string) {
	rts, err := r.h.RouteGet(ip)
	if err != nil || len(rts) == 0 {
		return false, ReasonNoRoute, fmt.Sprintf("no route to %s: %v", ip, err)
	}
	rt := rts[0]
	switch {
	case rt.Type == unix.RTN_LOCAL:
		return false, ReasonSelfAddress, fmt.Sprintf("%s is an address of this node", ip)
	case rt.Gw != nil:
		return false, ReasonNotOnLink, fmt.Sprintf("%s is reached via the router %s, not on this L2 segment (host-gw needs it on-link)", ip, rt.Gw)
	case rt.Type != unix.RTN_UNICAST:
		return false, ReasonNoRoute, fmt.Sprintf("%s is not reachable (route type %d)", ip, rt.Type)
	}
	return true, "", ""
}

// foreignDetail names the route that holds dst, for the report.
func (r *Routes) foreignDetail(dst *net.IPNet) string {
	fam := unix.AF_INET6
	if isV4(dst.IP) {
		fam = unix.AF_INET
	}
	rts, err := r.h.RouteListFiltered(fam, &netlink.Route{Dst: dst, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	if err != nil || len(rts) == 0 {
		return fmt.Sprintf("a route to %s not made by qoscni exists", dst)
	}
	return fmt.Sprintf("a route to %s not made by qoscni exists (%s, proto %s); left alone", dst, describe(rts[0]), rts[0].Protocol)
}

func describe(rt netlink.Route) string {
	if rt.Gw != nil {
		return "via " + rt.Gw.String()
	}
	return fmt.Sprintf("dev index %d", rt.LinkIndex)
}
