package shaping

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/qoscni/qoscni/internal/state"
)

// Per-pod controls kept in nftables: packet rate (packets/s) with its
// burst (packets), concurrent connections, and the DSCP of the pod's
// egress. qoscni's names, and Calico's (same units) where a pod has none
// of qoscni's.
const (
	AnnotationIngressPacketRate     = "qoscni.io/ingress-packet-rate"
	AnnotationEgressPacketRate      = "qoscni.io/egress-packet-rate"
	AnnotationIngressPacketBurst    = "qoscni.io/ingress-packet-burst"
	AnnotationEgressPacketBurst     = "qoscni.io/egress-packet-burst"
	AnnotationIngressMaxConnections = "qoscni.io/ingress-max-connections"
	AnnotationEgressMaxConnections  = "qoscni.io/egress-max-connections"
	AnnotationDSCP                  = "qoscni.io/dscp"
	CalicoIngressPacketRate         = "qos.projectcalico.org/ingressPacketRate"
	CalicoEgressPacketRate          = "qos.projectcalico.org/egressPacketRate"
	CalicoIngressPacketBurst        = "qos.projectcalico.org/ingressPacketBurst"
	CalicoEgressPacketBurst         = "qos.projectcalico.org/egressPacketBurst"
	CalicoIngressMaxConnections     = "qos.projectcalico.org/ingressMaxConnections"
	CalicoEgressMaxConnections      = "qos.projectcalico.org/egressMaxConnections"
	CalicoDSCP                      = "qos.projectcalico.org/dscp"
)

// Bounds of the controls. Calico stops packet rate and burst at 10k (an
// iptables limit); nftables' limit charges each packet 1e9/rate ns in
// integer nanoseconds, which stays within 1% up to 10M packets/s and
// breaks down above 1G. Connections are counted in 32 bits, as Calico's.
const (
	MaxPacketRate      = 10_000_000
	MaxPacketBurst     = 10_000_000
	DefaultPacketBurst = 5 // Calico's and nft's default
	MaxConnections     = 1<<32 - 1
)

// dscpNames are the standard code points' names (RFC 2474, 2597, 3246).
var dscpNames = map[string]uint8{
	"DF": 0, "EF": 46,
	"AF11": 10, "AF12": 12, "AF13": 14, "AF21": 18, "AF22": 20, "AF23": 22,
	"AF31": 26, "AF32": 28, "AF33": 30, "AF41": 34, "AF42": 36, "AF43": 38,
	"CS0": 0, "CS1": 8, "CS2": 16, "CS3": 24, "CS4": 32, "CS5": 40, "CS6": 48, "CS7": 56,
}

// ParseDSCP reads a code point: 0 to 63, or a name (EF, AF41, CS6, DF...).
func ParseDSCP(field, v string) (uint8, error) {
	t := strings.TrimSpace(v)
	if d, ok := dscpNames[strings.ToUpper(t)]; ok {
		return d, nil
	}
	n, err := strconv.ParseUint(t, 10, 8)
	if err != nil || n > 63 {
		return 0, invalid(field, fmt.Sprintf("%q", v), "must be 0 to 63 or a name: DF, EF, AF11 to AF43, CS0 to CS7")
	}
	return uint8(n), nil
}

type controlKeys struct {
	rate, burst, conns [2]string // qoscni's name, Calico's
}

var (
	ingressControls = controlKeys{
		rate:  [2]string{AnnotationIngressPacketRate, CalicoIngressPacketRate},
		burst: [2]string{AnnotationIngressPacketBurst, CalicoIngressPacketBurst},
		conns: [2]string{AnnotationIngressMaxConnections, CalicoIngressMaxConnections},
	}
	egressControls = controlKeys{
		rate:  [2]string{AnnotationEgressPacketRate, CalicoEgressPacketRate},
		burst: [2]string{AnnotationEgressPacketBurst, CalicoEgressPacketBurst},
		conns: [2]string{AnnotationEgressMaxConnections, CalicoEgressMaxConnections},
	}
)

// ParseControls reads a pod's controls from its annotations (nil: none).
// Every bad value is a CNI error 7 naming the annotation it was read from.
func ParseControls(a map[string]string) (*state.Controls, error) {
	in, err := ingressControls.parse(a)
	if err != nil {
		return nil, err
	}
	eg, err := egressControls.parse(a)
	if err != nil {
		return nil, err
	}
	c := &state.Controls{Ingress: in, Egress: eg}
	if v, from, ok := annotation(a, AnnotationDSCP, CalicoDSCP); ok {
		d, err := ParseDSCP(from, v)
		if err != nil {
			return nil, err
		}
		c.DSCP = &d
	}
	if c.Empty() {
		return nil, nil
	}
	return c, nil
}

func (k controlKeys) parse(a map[string]string) (*state.ControlDirection, error) {
	count := func(keys [2]string, max uint64) (uint64, string, error) {
		v, from, ok := annotation(a, keys[0], keys[1])
		if !ok {
			return 0, "", nil
		}
		n, err := parseQuantity(from, v, false)
		if err != nil {
			return 0, from, err
		}
		if n < 1 || n > max {
			return 0, from, invalid(from, fmt.Sprintf("%q", v), fmt.Sprintf("must be between 1 and %d", max))
		}
		return n, from, nil
	}
	rate, _, err := count(k.rate, MaxPacketRate)
	if err != nil {
		return nil, err
	}
	burst, burstFrom, err := count(k.burst, MaxPacketBurst)
	if err != nil {
		return nil, err
	}
	conns, _, err := count(k.conns, MaxConnections)
	if err != nil {
		return nil, err
	}
	if burst != 0 && rate == 0 {
		return nil, invalid(burstFrom, burst, fmt.Sprintf("a packet burst needs a packet rate (%s)", k.rate[0]))
	}
	if rate != 0 && burst == 0 {
		burst = DefaultPacketBurst
	}
	d := &state.ControlDirection{PacketRate: rate, PacketBurst: uint32(burst), MaxConnections: uint32(conns)}
	if d.Empty() {
		return nil, nil
	}
	return d, nil
}
