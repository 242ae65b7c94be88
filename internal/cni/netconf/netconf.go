// Package netconf decodes and validates the network configuration qoscni
// receives on stdin, including the runtimeConfig capability arguments and
// the pod identity carried in CNI_ARGS.
package netconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/qoscni/qoscni/internal/paths"
	"github.com/qoscni/qoscni/ipam"
	"github.com/qoscni/qoscni/shaping"
)

// Defaults applied when the network config leaves a key out.
const (
	DefaultBridge   = "qoscni0"
	DefaultStateDir = paths.StateDir
	// MinMTU is the IPv6 minimum link MTU; anything lower breaks dual-stack pods.
	MinMTU = 1280
	MaxMTU = 65535
)

// ContainerSettings carries per-pod kernel settings (seed-compatible key names).
type ContainerSettings struct {
	AllowIPForwarding bool `json:"allow_ip_forwarding"`
}

// NetConf is qoscni's plugin configuration.
type NetConf struct {
	types.PluginConf

	Bridge            string            `json:"bridge"`
	IsGateway         bool              `json:"isGateway"`
	IsDefaultGateway  bool              `json:"isDefaultGateway"`
	IPMasq            bool              `json:"ipMasq"`
	MTU               int               `json:"mtu"`
	HairpinMode       bool              `json:"hairpinMode"`
	PromiscMode       bool              `json:"promiscMode"`
	ContainerSettings ContainerSettings `json:"container_settings"`
	StateDir          string            `json:"stateDir"`

	// Shaping defaults, with the reference bandwidth plugin's keys (bit/s
	// and bits) so "type": "bandwidth" can be swapped for "qoscni".
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
	// MaxQueueDelay is the config's queueing-delay budget as written (a Go
	// duration); QueueDelay is the parsed form everything else uses.
	MaxQueueDelay string        `json:"maxQueueDelay,omitempty"`
	QueueDelay    time.Duration `json:"-"`
	// Ceilings bound every pod-supplied size (queue delay, burst, queue
	// bytes); ShapingCeilings is the parsed form.
	Ceilings        CeilingsConfig   `json:"ceilings"`
	ShapingCeilings shaping.Ceilings `json:"-"`
	// NodeCapacity is the node's bandwidth per direction that guarantees
	// share (Kubernetes quantities, bit/s); Capacity is the parsed form, 0
	// in a direction without a hierarchy.
	NodeCapacity NodeCapacityConfig `json:"nodeCapacity"`
	Capacity     shaping.Capacity   `json:"-"`

	// Policy turns on NetworkPolicy enforcement (standalone mode only),
	// with Calico's key: {"type": "k8s"}.
	Policy PolicyConfig `json:"policy"`

	RuntimeConfig RuntimeConfig `json:"runtimeConfig"`

	// IPAMConfig is the decoded built-in IPAM section; nil when ipam.type
	// names another plugin, which is then delegated to.
	IPAMConfig *ipam.Config `json:"-"`
	// Raw is the exact stdin, kept for IPAM delegation.
	Raw []byte `json:"-"`

	// UnknownKeys are keys of qoscni's object (and of its built-in ipam
	// object, "ipam."-prefixed) that qoscni does not read: not an error,
	// conflists carry keys for other tools, but worth one warning (a key
	// kept from a Calico config, such as "datastore_type", does nothing
	// here).
	UnknownKeys []string `json:"-"`

	// Problem is set by ParseForDel when the strict parse refused the
	// config: DEL goes on from what identifies the attachment.
	Problem error `json:"-"`
	// IPAMStoreOnly (ParseForDel): the built-in ipam section did not
	// validate; its store in IPAMStoreDir ("" = the default) is opened by
	// directory to free the attachment's addresses.
	IPAMStoreOnly bool   `json:"-"`
	IPAMStoreDir  string `json:"-"`
}

// PolicyConfig is the "policy" object.
type PolicyConfig struct {
	// Type "k8s" enforces the Kubernetes NetworkPolicy of the pods on this
	// network: a new pod's addresses are closed both ways until the node
	// agent has written its policy. "" (or no object) enforces none.
	Type string `json:"type,omitempty"`
}

// PolicyK8s is the policy type that enforces Kubernetes NetworkPolicy.
const PolicyK8s = "k8s"

// EnforcesPolicy says ADD closes new pods until the agent has written
// their NetworkPolicy.
func (c *NetConf) EnforcesPolicy() bool { return c.Policy.Type == PolicyK8s }

func (p PolicyConfig) validate(chained bool) error {
	switch p.Type {
	case "":
		return nil
	case PolicyK8s:
		if chained {
			return InvalidField("policy.type", fmt.Sprintf("%q", p.Type),
				"NetworkPolicy is the main plugin's in chained mode: remove the policy object from qoscni's entry")
		}
		return nil
	}
	return InvalidField("policy.type", fmt.Sprintf("%q", p.Type), `must be "k8s" (enforce Kubernetes NetworkPolicy) or absent`)
}

// CeilingsConfig is the "ceilings" object: the operator's bounds on what a
// pod's annotations may make the kernel hold, per direction. Absent keys
// take shaping's defaults.
type CeilingsConfig struct {
	// MaxQueueDelay is a Go duration.
	MaxQueueDelay string `json:"maxQueueDelay,omitempty"`
	// MaxBurst is in bits, like ingressBurst.
	MaxBurst uint64 `json:"maxBurst,omitempty"`
	// MaxQueueBytes is in bytes.
	MaxQueueBytes uint64 `json:"maxQueueBytes,omitempty"`
	// MaxRequest bounds a pod's guaranteed rate per direction: a
	// Kubernetes quantity in bit/s ("" or 0: the node capacity only).
	MaxRequest string `json:"maxRequest,omitempty"`
}

// NodeCapacityConfig is the "nodeCapacity" object. Ingress is traffic into
// pods, egress out of them; "" or 0 turns that direction's guarantees off.
type NodeCapacityConfig struct {
	Ingress string `json:"ingress,omitempty"`
	Egress  string `json:"egress,omitempty"`
}

// parse checks the capacities.
func (c NodeCapacityConfig) parse() (shaping.Capacity, error) {
	in, err := parseOptionalRate("nodeCapacity.ingress", c.Ingress)
	if err != nil {
		return shaping.Capacity{}, err
	}
	eg, err := parseOptionalRate("nodeCapacity.egress", c.Egress)
	if err != nil {
		return shaping.Capacity{}, err
	}
	return shaping.Capacity{IngressBits: in, EgressBits: eg}, nil
}

// parseOptionalRate reads a quantity in bit/s that is either 0 (or
// absent: off) or within Kubernetes' bandwidth range.
func parseOptionalRate(field, v string) (uint64, error) {
	if v == "" {
		return 0, nil
	}
	n, err := shaping.ParseBits(field, v)
	if err != nil {
		return 0, err
	}
	if n != 0 && (n < shaping.MinRateBits || n > shaping.MaxRateBits) {
		return 0, InvalidField(field, fmt.Sprintf("%q", v), "must be 0 (off) or between 1k and 1P bit/s")
	}
	return n, nil
}

// Check reports what the plugin would refuse in the ceilings (a CNI error
// naming the field).
func (c CeilingsConfig) Check() error {
	_, err := c.parse()
	return err
}

// parse checks the ceilings.
func (c CeilingsConfig) parse() (shaping.Ceilings, error) {
	var out shaping.Ceilings
	if c.MaxQueueDelay != "" {
		d, err := shaping.ParseDelay("ceilings.maxQueueDelay", c.MaxQueueDelay)
		if err != nil {
			return out, err
		}
		out.MaxQueueDelay = d
	}
	const maxBytes = math.MaxUint32
	if c.MaxBurst != 0 {
		if c.MaxBurst < shaping.MinCeilingBytes*8 || c.MaxBurst > maxBytes*8 {
			return out, InvalidField("ceilings.maxBurst", c.MaxBurst, fmt.Sprintf("must be between %d and %d bits", shaping.MinCeilingBytes*8, uint64(maxBytes)*8))
		}
		out.MaxBurstBytes = c.MaxBurst / 8
	}
	if c.MaxQueueBytes != 0 {
		if c.MaxQueueBytes < shaping.MinCeilingBytes || c.MaxQueueBytes > maxBytes {
			return out, InvalidField("ceilings.maxQueueBytes", c.MaxQueueBytes, fmt.Sprintf("must be between %d and %d bytes", shaping.MinCeilingBytes, uint64(maxBytes)))
		}
		out.MaxQueueBytes = c.MaxQueueBytes
	}
	r, err := parseOptionalRate("ceilings.maxRequest", c.MaxRequest)
	if err != nil {
		return out, err
	}
	out.MaxRequestBits = r
	return out, nil
}

// parseShaping parses the ceilings and the node capacity, then the
// config's own delay budget, which must fit under the ceilings: the plugin
// and the agent's reshaping take them from here (the agent through the
// state record), typed.
func (c *NetConf) parseShaping() error {
	ceil, err := c.Ceilings.parse()
	if err != nil {
		return err
	}
	c.ShapingCeilings = ceil
	capacity, err := c.NodeCapacity.parse()
	if err != nil {
		return err
	}
	c.Capacity = capacity
	if c.MaxQueueDelay == "" {
		return nil
	}
	d, err := shaping.ParseDelay("maxQueueDelay", c.MaxQueueDelay)
	if err != nil {
		return err
	}
	limit := ceil.MaxQueueDelay
	if limit == 0 {
		limit = shaping.DefaultCeilingQueueDelay
	}
	if d > limit {
		return InvalidField("maxQueueDelay", fmt.Sprintf("%q", c.MaxQueueDelay),
			fmt.Sprintf("above ceilings.maxQueueDelay %v (raise the ceiling to allow it)", limit))
	}
	c.QueueDelay = d
	return nil
}

// BuiltinIPAM reports whether addresses come from qoscni's own allocator.
func (c *NetConf) BuiltinIPAM() bool { return c.IPAMConfig != nil }

// Chained reports whether a previous plugin in the chain produced a result.
func (c *NetConf) Chained() bool { return c.PrevResult != nil }

// InvalidField builds the CNI error for a bad config value: code 7 with the
// field path and the offending value in the message.
func InvalidField(field string, value any, why string) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("invalid %s %v: %s", field, value, why), "")
}

// Header is what names a config's network and where its traces are kept:
// the plugin's call journal files each call under it. Parse and
// ParseForDel return it from their one decode of stdin whatever they
// refuse, as far as that decode read it (empty when stdin is not JSON).
type Header struct {
	Name     string
	StateDir string // as given, or DefaultStateDir once defaults applied; "" when unknown
}

// Parse decodes and validates stdin. Malformed JSON yields code 6, invalid
// values code 7, an unsupported cniVersion code 1.
func Parse(stdin []byte) (*NetConf, Header, error) {
	conf := &NetConf{}
	err := conf.parse(stdin)
	h := Header{Name: conf.Name, StateDir: conf.StateDir}
	if err != nil {
		return nil, h, err
	}
	return conf, h, nil
}

// parse fills c from stdin. encoding/json reads a whole value before it
// decodes any, and goes on past a key of the wrong type, so what c holds
// after an error is what a loose decode would have read.
func (c *NetConf) parse(stdin []byte) error {
	dec := json.NewDecoder(bytes.NewReader(stdin))
	if err := dec.Decode(c); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return InvalidField(typeErr.Field, typeErr.Value, "wrong JSON type, want "+typeErr.Type.String())
		}
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode network config: %v", err), "")
	}
	c.Raw = stdin
	if err := checkVersion(c.CNIVersion); err != nil {
		return err
	}
	if err := c.applyDefaults(); err != nil {
		return err
	}
	if err := c.validate(); err != nil {
		return err
	}
	if c.IPAM.Type == "" || c.IPAM.Type == "qoscni" {
		ic, err := decodeIPAM(stdin)
		if err != nil {
			return err
		}
		c.IPAMConfig = ic
	}
	c.UnknownKeys = unknownKeys(stdin, c.IPAMConfig != nil)
	// Until IPAM answers, the pod may get addresses of either family;
	// behind a main plugin it has those of the previous result.
	podFamilies := BothFamilies
	if c.RawPrevResult != nil {
		if err := version.ParsePrevResult(&c.PluginConf); err != nil {
			return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
		}
		ips, err := validatePrevResult(c.PrevResult)
		if err != nil {
			return err
		}
		if c.PrevResult != nil {
			podFamilies = FamiliesOf(ips)
		}
	}
	if err := c.Policy.validate(c.PrevResult != nil); err != nil {
		return err
	}
	ports, err := resolvePorts(c.RuntimeConfig.PortMappings, podFamilies)
	if err != nil {
		return err
	}
	c.RuntimeConfig.Ports = ports
	return nil
}

// validatePrevResult refuses what the CNI library decodes but no runtime
// could read back: an IP entry without an address, a route without a
// destination. Chained mode passes prevResult on and records its IPs,
// which it returns.
func validatePrevResult(r types.Result) ([]net.IP, error) {
	res, err := current.NewResultFromResult(r)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
	}
	var ips []net.IP
	for i, ip := range res.IPs {
		if ip == nil || ip.Address.IP == nil || ip.Address.Mask == nil {
			return nil, InvalidField(fmt.Sprintf("prevResult.ips[%d].address", i), "(none)", "missing")
		}
		ips = append(ips, ip.Address.IP)
	}
	for i, rt := range res.Routes {
		if rt == nil || rt.Dst.IP == nil || rt.Dst.Mask == nil {
			return nil, InvalidField(fmt.Sprintf("prevResult.routes[%d].dst", i), "(none)", "missing")
		}
	}
	return ips, nil
}

// SupportedVersions are the CNI spec versions qoscni speaks.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

func checkVersion(v string) error {
	if v == "" {
		// The spec treats a missing version as 0.1.0, which we do not speak.
		return types.NewError(types.ErrIncompatibleCNIVersion, "incompatible CNI versions",
			fmt.Sprintf("config has no cniVersion; supported: %s", strings.Join(SupportedVersions, ", ")))
	}
	for _, s := range SupportedVersions {
		if s == v {
			return nil
		}
	}
	return types.NewError(types.ErrIncompatibleCNIVersion, "incompatible CNI versions",
		fmt.Sprintf("cniVersion %q is not supported; supported: %s", v, strings.Join(SupportedVersions, ", ")))
}

func (c *NetConf) applyDefaults() error {
	if c.Bridge == "" {
		c.Bridge = DefaultBridge
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.IsDefaultGateway {
		// A default route needs a gateway address on the bridge.
		c.IsGateway = true
	}
	return nil
}

func (c *NetConf) validate() error {
	if err := ValidateIfName("bridge", c.Bridge); err != nil {
		return err
	}
	if c.MTU != 0 && (c.MTU < MinMTU || c.MTU > MaxMTU) {
		return InvalidField("mtu", c.MTU, fmt.Sprintf("must be between %d and %d", MinMTU, MaxMTU))
	}
	if !strings.HasPrefix(c.StateDir, "/") {
		return InvalidField("stateDir", fmt.Sprintf("%q", c.StateDir), "must be an absolute path")
	}
	if err := c.parseShaping(); err != nil {
		return err
	}
	return c.RuntimeConfig.validate()
}

// ValidateIfName checks a Linux interface name: 1..15 bytes, no '/', no
// whitespace, not "." or "..".
func ValidateIfName(field, name string) error {
	switch {
	case name == "":
		return InvalidField(field, `""`, "must not be empty")
	case len(name) > 15:
		return InvalidField(field, fmt.Sprintf("%q", name), "longer than 15 bytes")
	case name == "." || name == "..":
		return InvalidField(field, fmt.Sprintf("%q", name), "is not a valid interface name")
	case strings.ContainsAny(name, "/: \t\n"):
		return InvalidField(field, fmt.Sprintf("%q", name), "contains '/', ':' or whitespace")
	}
	return nil
}

// decodeIPAM reads the "ipam" object into the built-in allocator's config.
func decodeIPAM(stdin []byte) (*ipam.Config, error) {
	var wrapper struct {
		IPAM json.RawMessage `json:"ipam"`
	}
	if err := json.Unmarshal(stdin, &wrapper); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode ipam: %v", err), "")
	}
	if len(wrapper.IPAM) == 0 || string(wrapper.IPAM) == "null" || string(wrapper.IPAM) == "{}" {
		// No IPAM at all: fine in chained mode, refused by a standalone ADD.
		return nil, nil
	}
	ic := &ipam.Config{}
	if err := json.Unmarshal(wrapper.IPAM, ic); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return nil, InvalidField("ipam."+typeErr.Field, typeErr.Value, "wrong JSON type, want "+typeErr.Type.String())
		}
		// Typed values (subnets, addresses) report their own parse errors.
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("invalid ipam: %v", err), "")
	}
	if err := ic.Validate(); err != nil {
		return nil, err
	}
	return ic, nil
}

// PodArgs is the pod identity the runtime passes in CNI_ARGS.
type PodArgs struct {
	Namespace string
	Name      string
	UID       string
	// InfraContainerID is what the kubelet/CRI calls the sandbox ID.
	InfraContainerID string
}

// ParseArgs reads the K=V;K=V pairs of CNI_ARGS. Unknown keys are ignored,
// as every runtime adds its own (IgnoreUnknown, K8S_POD_INFRA_CONTAINER_ID...).
func ParseArgs(s string) (PodArgs, error) {
	var a PodArgs
	if s == "" {
		return a, nil
	}
	for _, pair := range strings.Split(s, ";") {
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			return a, types.NewError(types.ErrInvalidEnvironmentVariables,
				fmt.Sprintf("invalid CNI_ARGS pair %q: want KEY=VALUE", pair), "")
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			a.Namespace = v
		case "K8S_POD_NAME":
			a.Name = v
		case "K8S_POD_UID":
			a.UID = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			a.InfraContainerID = v
		}
	}
	return a, nil
}

// Family returns 4 or 6 for an address.
func Family(ip net.IP) int {
	if ip.To4() != nil {
		return 4
	}
	return 6
}
