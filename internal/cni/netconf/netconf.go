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
	IngressRate   uint64 `json:"ingressRate,omitempty"`
	IngressBurst  uint64 `json:"ingressBurst,omitempty"`
	EgressRate    uint64 `json:"egressRate,omitempty"`
	EgressBurst   uint64 `json:"egressBurst,omitempty"`
	MaxQueueDelay string `json:"maxQueueDelay,omitempty"`
	// Ceilings bound every pod-supplied size (queue delay, burst, queue
	// bytes); ShapingCeilings is the parsed form.
	Ceilings        CeilingsConfig   `json:"ceilings"`
	ShapingCeilings shaping.Ceilings `json:"-"`

	RuntimeConfig RuntimeConfig `json:"runtimeConfig"`

	// IPAMConfig is the decoded built-in IPAM section; nil when ipam.type
	// names another plugin, which is then delegated to.
	IPAMConfig *ipam.Config `json:"-"`
	// Raw is the exact stdin, kept for IPAM delegation.
	Raw []byte `json:"-"`

	// UnknownKeys are keys of qoscni's object (and of its built-in ipam
	// object, "ipam."-prefixed) that qoscni does not read: not an error,
	// conflists carry keys for other tools, but worth one warning (a key
	// kept from a Calico config, such as "policy", does nothing here).
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
}

// parse checks the ceilings and the config's own delay budget against them.
func (c CeilingsConfig) parse(defaultDelay string) (shaping.Ceilings, error) {
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
	if defaultDelay != "" {
		d, err := shaping.ParseDelay("maxQueueDelay", defaultDelay)
		if err != nil {
			return out, err
		}
		ceil := out.MaxQueueDelay
		if ceil == 0 {
			ceil = shaping.DefaultCeilingQueueDelay
		}
		if d > ceil {
			return out, InvalidField("maxQueueDelay", fmt.Sprintf("%q", defaultDelay),
				fmt.Sprintf("above ceilings.maxQueueDelay %v (raise the ceiling to allow it)", ceil))
		}
	}
	return out, nil
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

// Parse decodes and validates stdin. Malformed JSON yields code 6, invalid
// values code 7, an unsupported cniVersion code 1.
func Parse(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	dec := json.NewDecoder(bytes.NewReader(stdin))
	if err := dec.Decode(conf); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return nil, InvalidField(typeErr.Field, typeErr.Value, "wrong JSON type, want "+typeErr.Type.String())
		}
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode network config: %v", err), "")
	}
	conf.Raw = stdin
	if err := checkVersion(conf.CNIVersion); err != nil {
		return nil, err
	}
	if err := conf.applyDefaults(); err != nil {
		return nil, err
	}
	if err := conf.validate(); err != nil {
		return nil, err
	}
	if conf.IPAM.Type == "" || conf.IPAM.Type == "qoscni" {
		ic, err := decodeIPAM(stdin)
		if err != nil {
			return nil, err
		}
		conf.IPAMConfig = ic
	}
	conf.UnknownKeys = unknownKeys(stdin, conf.IPAMConfig != nil)
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
		}
		if err := validatePrevResult(conf.PrevResult); err != nil {
			return nil, err
		}
	}
	return conf, nil
}

// validatePrevResult refuses what the CNI library decodes but no runtime
// could read back: an IP entry without an address, a route without a
// destination. Chained mode passes prevResult on and records its IPs.
func validatePrevResult(r types.Result) error {
	res, err := current.NewResultFromResult(r)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
	}
	for i, ip := range res.IPs {
		if ip == nil || ip.Address.IP == nil || ip.Address.Mask == nil {
			return InvalidField(fmt.Sprintf("prevResult.ips[%d].address", i), "(none)", "missing")
		}
	}
	for i, rt := range res.Routes {
		if rt == nil || rt.Dst.IP == nil || rt.Dst.Mask == nil {
			return InvalidField(fmt.Sprintf("prevResult.routes[%d].dst", i), "(none)", "missing")
		}
	}
	return nil
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
	ceil, err := c.Ceilings.parse(c.MaxQueueDelay)
	if err != nil {
		return err
	}
	c.ShapingCeilings = ceil
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
