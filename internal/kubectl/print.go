package kubectl

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	agentpkg "github.com/qoscni/qoscni/internal/agent"
	"github.com/qoscni/qoscni/internal/agent/reconcile"
	"github.com/qoscni/qoscni/shaping"
)

// rate is bit/s with one decimal in the largest unit under it.
func rate(bits float64) string {
	if bits <= 0 {
		return "-"
	}
	for _, u := range []struct {
		div  float64
		name string
	}{{1e12, "Tbit/s"}, {1e9, "Gbit/s"}, {1e6, "Mbit/s"}, {1e3, "kbit/s"}} {
		if bits >= u.div {
			return strconv.FormatFloat(bits/u.div, 'f', 1, 64) + u.name
		}
	}
	return strconv.FormatFloat(bits, 'f', 0, 64) + "bit/s"
}

func kernel(ok bool) string {
	if ok {
		return "yes"
	}
	return "NO"
}

// WriteStatus prints one row per pod direction of the cluster.
func WriteStatus(w io.Writer, series []Series) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tPOD\tIFACE\tDIR\tLIMIT\tREQUEST\tSENT\tDROPPED\tRATE-DROPPED\tIN-KERNEL")
	for _, s := range series {
		fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\t%s\t%.0fB\t%.0f\t%.0f\t%s\n", s.Node, s.Namespace, s.Pod, s.Interface, s.Direction,
			rate(s.LimitBits), rate(s.RequestBits), s.SentBytes, s.Dropped, s.ControlDrops, kernel(s.InKernel))
	}
	return tw.Flush()
}

// WriteTop prints the n busiest pod directions, by throughput or by drops.
func WriteTop(w io.Writer, rates []Rate, byDrops bool, n int) error {
	sort.SliceStable(rates, func(i, j int) bool {
		if byDrops {
			return rates[i].Drops > rates[j].Drops
		}
		return rates[i].Bits > rates[j].Bits
	})
	if n > 0 && len(rates) > n {
		rates = rates[:n]
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tPOD\tIFACE\tDIR\tRATE\tLIMIT\tOF-LIMIT\tDROPS/S")
	for _, r := range rates {
		share := "-"
		if r.LimitBits > 0 {
			share = fmt.Sprintf("%.0f%%", 100*r.Bits/r.LimitBits)
		}
		fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\t%s\t%s\t%.1f\n", r.Node, r.Namespace, r.Pod, r.Interface, r.Direction,
			rate(r.Bits), rate(r.LimitBits), share, r.Drops)
	}
	return tw.Flush()
}

// shapingKey reports an annotation that is an input of qoscni.
func shapingKey(k string) bool {
	return k != reconcile.AnnotationEffective && (k == shaping.AnnotationIngressRate || k == shaping.AnnotationEgressRate ||
		strings.HasPrefix(k, "qoscni.io/") || strings.HasPrefix(k, shaping.CalicoPrefix))
}

// explainReasons are the Events that say what became of a pod's shaping.
var explainReasons = map[string]bool{
	reconcile.ReasonShapingApplied: true, reconcile.ReasonShapingNotEnforced: true, reconcile.ReasonInvalidAnnotation: true, reconcile.ReasonClaimOverridesRequest: true,
	"FailedCreatePodSandBox": true,
}

// Explain prints what a pod asked for (its annotations), what its node's
// agent reports it got (qoscni.io/effective-shaping), the Events about it,
// and what its agent reads from the kernel now: devices, classes, rates
// over window, drops, backlog, hostPorts.
func (c *Cluster) Explain(ctx context.Context, w io.Writer, namespace, name string, window time.Duration) error {
	pod, err := c.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "Pod %s/%s on node %s, IP %s\n\nAsked for (annotations):\n", namespace, name, pod.Spec.NodeName, pod.Status.PodIP)
	var keys []string
	for k := range pod.Annotations {
		if shapingKey(k) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	if len(keys) == 0 {
		fmt.Fprintln(w, "  none")
	}
	for _, k := range keys {
		fmt.Fprintf(w, "  %s: %s\n", k, pod.Annotations[k])
	}
	fmt.Fprintf(w, "\nGot (%s):\n", reconcile.AnnotationEffective)
	if v, ok := pod.Annotations[reconcile.AnnotationEffective]; ok {
		var pretty bytes.Buffer
		if err := json.Indent(&pretty, []byte(v), "  ", "  "); err != nil {
			fmt.Fprintf(w, "  %s\n", v)
		} else {
			fmt.Fprintf(w, "  %s\n", pretty.String())
		}
	} else {
		fmt.Fprintln(w, "  not shaped on its node (no annotation: nothing asked, or the agent has not seen it yet)")
	}
	evs, err := c.Client.CoreV1().Events(namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return err
	}
	sort.Slice(evs.Items, func(i, j int) bool { return evs.Items[i].LastTimestamp.Before(&evs.Items[j].LastTimestamp) })
	fmt.Fprintln(w, "\nEvents:")
	n := 0
	for _, ev := range evs.Items {
		if explainReasons[ev.Reason] && ev.InvolvedObject.UID == pod.UID {
			fmt.Fprintf(w, "  %s  %s  %s: %s\n", ev.LastTimestamp.Format(time.RFC3339), ev.Type, ev.Reason, ev.Message)
			n++
		}
	}
	if n == 0 {
		fmt.Fprintln(w, "  none")
	}
	agents, err := c.agents(ctx)
	if err != nil {
		return err
	}
	agent, ok := agents[pod.Spec.NodeName]
	if !ok {
		fmt.Fprintf(w, "\nOn the node: no running qoscni agent on %s\n", pod.Spec.NodeName)
		return nil
	}
	raw, err := c.Client.CoreV1().Pods(c.ns()).ProxyGet("http", agent, c.port(), "/status",
		map[string]string{"namespace": namespace, "pod": name, "interval": window.String()}).DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("status from the agent on %s: %w", pod.Spec.NodeName, err)
	}
	var rows []agentpkg.StatusRow
	if err := json.Unmarshal(raw, &rows); err != nil {
		return fmt.Errorf("status from the agent on %s: %w", pod.Spec.NodeName, err)
	}
	fmt.Fprintf(w, "\nOn the node (its agent read the kernel over %v):\n", window)
	if len(rows) == 0 {
		fmt.Fprintln(w, "  no shaping and no hostPorts")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IFACE\tDIR\tDEVICE\tCLASS\tLIMIT\tREQUEST\tRATE\tDROPS\tBACKLOG\tIN-KERNEL\tHOSTPORTS")
	for _, r := range rows {
		class := r.Class
		if class == "" {
			class = "-"
		}
		ports := "-"
		for i, p := range r.HostPorts {
			if i == 0 {
				ports = ""
			} else {
				ports += ","
			}
			ports += strconv.Itoa(p)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%dB\t%s\t%s\n", r.Interface, r.Direction, r.Device, class,
			rate(float64(r.LimitBits)), rate(float64(r.RequestBits)), rate(r.RateBits), r.Drops, r.BacklogBytes, kernel(r.QdiscFound), ports)
	}
	return tw.Flush()
}
