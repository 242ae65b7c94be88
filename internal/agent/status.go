package agent

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/metrics"
)

// StatusRow is one shaped direction of one attachment.
type StatusRow struct {
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
	QdiscFound   bool    `json:"qdiscFound"`
}

// Status reads the node twice, interval apart, and returns one row per
// shaped direction (attachments without shaping but with hostPorts get a
// row with direction "-"), from the records of every state directory src
// names, as the agent's metrics and reconciler read them.
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
	secs := time.Since(t0).Seconds()
	type dk struct {
		k   state.Key
		dir string
	}
	before := map[dk]*metrics.QdiscStats{}
	for _, a := range first.Attachments {
		for _, d := range a.Dirs {
			before[dk{a.Record.Key(), d.Direction}] = d.Stats
		}
	}
	var rows []StatusRow
	for _, a := range second.Attachments {
		var ports []int
		for _, p := range a.Record.Ports {
			ports = append(ports, p.HostPort)
		}
		if len(a.Dirs) == 0 {
			if len(ports) > 0 {
				rows = append(rows, StatusRow{Namespace: a.Namespace, Pod: a.Pod, Interface: a.Interface, Direction: "-", HostPorts: ports})
			}
			continue
		}
		for _, d := range a.Dirs {
			r := StatusRow{Namespace: a.Namespace, Pod: a.Pod, Interface: a.Interface, Direction: d.Direction,
				Device: d.Config.Device, LimitBits: d.Config.RateBits, HostPorts: ports}
			if s := d.Stats; s != nil {
				r.QdiscFound = true
				r.Drops = uint64(s.Drops)
				r.BacklogBytes = s.Backlog
				if b := before[dk{a.Record.Key(), d.Direction}]; b != nil && s.Bytes >= b.Bytes && secs > 0 {
					r.RateBits = float64(s.Bytes-b.Bytes) * 8 / secs
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
	fmt.Fprintln(tw, "POD\tIFACE\tDIRECTION\tLIMIT\tRATE\tUSE\tDROPS\tBACKLOG\tHOSTPORTS")
	for _, r := range rows {
		limit, rate, use, drops, backlog := "-", "-", "-", "-", "-"
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
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Namespace, r.Pod, r.Interface, r.Direction,
			limit, rate, use, drops, backlog, hp)
	}
	return tw.Flush()
}

func bits(v float64) string {
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
