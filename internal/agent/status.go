package agent

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/metrics"
	"github.com/qoscni/qoscni/shaping"
)

// Row scopes: a pod's direction, or a direction of the node hierarchy.
const (
	ScopePod  = "pod"
	ScopeNode = "node"
)

// StatusRow is one shaped direction of one attachment, or (Scope "node")
// one direction of the node's guaranteed-bandwidth hierarchy. The JSON
// output stays one array: node rows come after the pods' and carry no
// pod.
type StatusRow struct {
	Scope        string  `json:"scope"`
	Namespace    string  `json:"namespace"`
	Pod          string  `json:"pod"`
	Interface    string  `json:"interface"`
	Direction    string  `json:"direction"`
	Device       string  `json:"device"`
	LimitBits    uint64  `json:"limitBitsPerSecond"`
	RateBits     float64 `json:"rateBitsPerSecond"` // measured over the interval
	Drops        uint64  `json:"drops"`
	BacklogBytes uint32  `json:"backlogBytes"`
	HostPorts    []int   `json:"hostPorts"`
	// QdiscFound: the direction's root qdisc, or for a pod in the node
	// hierarchy its class, was found.
	QdiscFound bool `json:"qdiscFound"`

	// A pod in the node hierarchy: its class ("1:<minor>" on Device),
	// request and priority; LimitBits is its ceil.
	Class       string `json:"class,omitempty"`
	RequestBits uint64 `json:"requestBitsPerSecond,omitempty"`
	Priority    string `json:"priority,omitempty"`

	// Node rows: the hierarchy's capacity, the sum of requests and what
	// is left (negative when the capacity is below the requests).
	CapacityBits uint64 `json:"capacityBitsPerSecond,omitempty"`
	ReservedBits uint64 `json:"reservedBitsPerSecond,omitempty"`
	HeadroomBits *int64 `json:"headroomBitsPerSecond,omitempty"`
}

// Status reads the node twice, interval apart, and returns one row per
// shaped direction, its own pipeline's or its class in the node hierarchy
// (attachments without shaping but with hostPorts get a row with
// direction "-"), from the records of every state directory src names, as
// the agent's metrics and reconciler read them; then one row per
// direction of the node hierarchy.
func Status(src cniconf.StateSources, netnsPath string, interval time.Duration) ([]StatusRow, error) {
	ns, err := metrics.OpenNetns(netnsPath)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	cache := metrics.NewNodeRecords(src)
	first, err := metrics.Take(cache, ns)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	time.Sleep(interval)
	second, err := metrics.Take(cache, ns)
	if err != nil {
		return nil, err
	}
	if second.HierarchyErr != nil {
		return nil, second.HierarchyErr
	}
	secs := time.Since(t0).Seconds()
	type dk struct {
		k   state.Key
		dir string
	}
	before := map[dk]*metrics.QdiscStats{}
	classBefore := map[dk]uint64{}
	for _, a := range first.Attachments {
		for _, d := range a.Dirs {
			before[dk{a.Record.Key(), d.Direction}] = d.Stats
		}
		for _, g := range a.Guarantees {
			if g.Class != nil {
				classBefore[dk{a.Record.Key(), g.Direction}] = g.Class.Stats.Bytes
			}
		}
	}
	rate := func(now, then uint64) float64 {
		if now < then || secs <= 0 {
			return 0
		}
		return float64(now-then) * 8 / secs
	}
	var rows []StatusRow
	for _, a := range second.Attachments {
		// A hostPort is mapped once per address family of the pod: list
		// each port once.
		var ports []int
		for _, p := range a.Record.Ports {
			if !slices.Contains(ports, p.HostPort) {
				ports = append(ports, p.HostPort)
			}
		}
		if len(a.Dirs) == 0 && len(a.Guarantees) == 0 {
			if len(ports) > 0 {
				rows = append(rows, StatusRow{Scope: ScopePod, Namespace: a.Namespace, Pod: a.Pod, Interface: a.Interface, Direction: "-", HostPorts: ports})
			}
			continue
		}
		for _, d := range a.Dirs {
			r := StatusRow{Scope: ScopePod, Namespace: a.Namespace, Pod: a.Pod, Interface: a.Interface, Direction: d.Direction,
				Device: d.Config.Device, LimitBits: d.Config.RateBits, HostPorts: ports}
			if s := d.Stats; s != nil {
				r.QdiscFound = true
				r.Drops = uint64(s.Drops)
				r.BacklogBytes = s.Backlog
				if b := before[dk{a.Record.Key(), d.Direction}]; b != nil {
					r.RateBits = rate(s.Bytes, b.Bytes)
				}
			}
			rows = append(rows, r)
		}
		for _, g := range a.Guarantees {
			ifb := shaping.HierarchyIngressIFB
			if g.Direction == metrics.DirEgress {
				ifb = shaping.HierarchyEgressIFB
			}
			r := StatusRow{Scope: ScopePod, Namespace: a.Namespace, Pod: a.Pod, Interface: a.Interface, Direction: g.Direction,
				Device: ifb, Class: fmt.Sprintf("1:%x", g.Minor), LimitBits: g.Config.CeilBits,
				RequestBits: g.Config.RequestBits, Priority: g.Config.Priority, HostPorts: ports}
			if c := g.Class; c != nil {
				r.QdiscFound = true
				r.Drops = uint64(c.Stats.Drops)
				r.BacklogBytes = c.Stats.Backlog
				if b, ok := classBefore[dk{a.Record.Key(), g.Direction}]; ok {
					r.RateBits = rate(c.Stats.Bytes, b)
				}
			}
			rows = append(rows, r)
		}
	}
	sort.SliceStable(rows, func(i, j int) bool {
		if rows[i].Namespace != rows[j].Namespace {
			return rows[i].Namespace < rows[j].Namespace
		}
		if rows[i].Pod != rows[j].Pod {
			return rows[i].Pod < rows[j].Pod
		}
		if rows[i].Interface != rows[j].Interface {
			return rows[i].Interface < rows[j].Interface
		}
		return rows[i].Direction < rows[j].Direction
	})
	for _, h := range second.Hierarchy {
		ifb := shaping.HierarchyIngressIFB
		if h.Direction == metrics.DirEgress {
			ifb = shaping.HierarchyEgressIFB
		}
		headroom := int64(h.HeadroomBytes() * 8)
		rows = append(rows, StatusRow{Scope: ScopeNode, Direction: h.Direction, Device: ifb, QdiscFound: true,
			CapacityBits: h.CapacityBytes * 8, ReservedBits: h.ReservedBytes * 8, HeadroomBits: &headroom})
	}
	return rows, nil
}

// WriteStatus prints rows as a table, or as JSON when asJSON.
func WriteStatus(w io.Writer, rows []StatusRow, asJSON bool) error {
	if asJSON {
		if rows == nil {
			rows = []StatusRow{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tIFACE\tDIRECTION\tREQUEST\tLIMIT\tPRIO\tRATE\tUSE\tDROPS\tBACKLOG\tHOSTPORTS")
	var node []StatusRow
	for _, r := range rows {
		if r.Scope == ScopeNode {
			node = append(node, r)
			continue
		}
		request, limit, prio, rate, use, drops, backlog := "-", "-", "-", "-", "-", "-", "-"
		if r.Class != "" {
			// In the node hierarchy: a best-effort pod's request is 0.
			request, prio = bits(float64(r.RequestBits)), r.Priority
		}
		if r.LimitBits > 0 {
			limit = bits(float64(r.LimitBits))
		}
		if r.QdiscFound {
			rate = bits(r.RateBits)
			drops = fmt.Sprint(r.Drops)
			backlog = fmt.Sprintf("%dB", r.BacklogBytes)
			if r.LimitBits > 0 {
				use = fmt.Sprintf("%.0f%%", 100*r.RateBits/float64(r.LimitBits))
			}
		} else if r.Class != "" {
			rate = "no class"
		} else if r.Direction != "-" {
			rate = "no qdisc"
		}
		ports := make([]string, len(r.HostPorts))
		for i, p := range r.HostPorts {
			ports[i] = fmt.Sprint(p)
		}
		hp := strings.Join(ports, ",")
		if hp == "" {
			hp = "-"
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Namespace, r.Pod, r.Interface, r.Direction,
			request, limit, prio, rate, use, drops, backlog, hp)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(node) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE HIERARCHY\tDIRECTION\tCAPACITY\tRESERVED\tHEADROOM")
	for _, r := range node {
		headroom := "-"
		if r.HeadroomBits != nil {
			headroom = bits(float64(*r.HeadroomBits))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Device, r.Direction, bits(float64(r.CapacityBits)), bits(float64(r.ReservedBits)), headroom)
	}
	return tw.Flush()
}

func bits(v float64) string {
	if v < 0 {
		return "-" + bits(-v)
	}
	switch {
	case v >= 1e9:
		return fmt.Sprintf("%.2fGbit", v/1e9)
	case v >= 1e6:
		return fmt.Sprintf("%.2fMbit", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1fKbit", v/1e3)
	}
	return fmt.Sprintf("%.0fbit", v)
}
