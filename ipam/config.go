package ipam

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/qoscni/qoscni/internal/paths"
)

const (
	// PluginType is the ipam.type value this allocator answers to (besides "").
	PluginType = "qoscni"
	// DefaultDataDir is where stores live when ipam.dataDir is unset.
	DefaultDataDir = paths.IPAMDir
)

// Range is one address range of a range set (host-local compatible JSON keys).
type Range struct {
	Subnet     types.IPNet `json:"subnet"`
	RangeStart net.IP      `json:"rangeStart,omitempty"`
	RangeEnd   net.IP      `json:"rangeEnd,omitempty"`
	Gateway    net.IP      `json:"gateway,omitempty"`
}

// RangeSet is a list of ranges of one IP family; an attachment gets one address per set.
type RangeSet []Range

// Config is the "ipam" object of the network config when ipam.type is "" or "qoscni".
// JSON decoding also accepts host-local's legacy top-level keys subnet, rangeStart,
// rangeEnd and gateway, which become the first range set.
type Config struct {
	Type    string         `json:"type,omitempty"`
	Ranges  []RangeSet     `json:"ranges"`
	Routes  []*types.Route `json:"routes,omitempty"`
	DataDir string         `json:"dataDir,omitempty"`
	// AssignIPv4 and AssignIPv6 are Calico's keys, which users migrating
	// from a Calico config carry: false ("false") leaves out the range
	// sets of that family. JSON booleans or the strings "true"/"false".
	AssignIPv4 json.RawMessage `json:"assign_ipv4,omitempty"`
	AssignIPv6 json.RawMessage `json:"assign_ipv6,omitempty"`

	// legacy records that Ranges[0][0] came from the top-level keys, so that errors name
	// the keys the user actually wrote.
	legacy bool
	// legacyOrphan names a legacy key given without "subnet"; reported by Validate.
	legacyOrphan string
}

type configJSON struct {
	Type       string          `json:"type,omitempty"`
	Ranges     []RangeSet      `json:"ranges"`
	Routes     []*types.Route  `json:"routes,omitempty"`
	DataDir    string          `json:"dataDir,omitempty"`
	Subnet     *types.IPNet    `json:"subnet,omitempty"`
	RangeStart net.IP          `json:"rangeStart,omitempty"`
	RangeEnd   net.IP          `json:"rangeEnd,omitempty"`
	Gateway    net.IP          `json:"gateway,omitempty"`
	AssignIPv4 json.RawMessage `json:"assign_ipv4,omitempty"`
	AssignIPv6 json.RawMessage `json:"assign_ipv6,omitempty"`
}

// KnownKeys are the keys of the ipam object the built-in allocator reads;
// the plugin warns about any other.
var KnownKeys = []string{"type", "ranges", "routes", "dataDir", "subnet", "rangeStart", "rangeEnd", "gateway", "assign_ipv4", "assign_ipv6"}

// UnmarshalJSON decodes the ipam object, folding host-local's legacy single-range keys
// into a leading range set the way host-local does.
func (c *Config) UnmarshalJSON(data []byte) error {
	var raw configJSON
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	*c = Config{Type: raw.Type, Ranges: raw.Ranges, Routes: raw.Routes, DataDir: raw.DataDir, AssignIPv4: raw.AssignIPv4, AssignIPv6: raw.AssignIPv6}
	switch {
	case raw.Subnet != nil:
		legacy := Range{Subnet: *raw.Subnet, RangeStart: raw.RangeStart, RangeEnd: raw.RangeEnd, Gateway: raw.Gateway}
		c.Ranges = append([]RangeSet{{legacy}}, c.Ranges...)
		c.legacy = true
	case raw.RangeStart != nil:
		c.legacyOrphan = "rangeStart"
	case raw.RangeEnd != nil:
		c.legacyOrphan = "rangeEnd"
	case raw.Gateway != nil:
		c.legacyOrphan = "gateway"
	}
	return nil
}

func invalid(format string, args ...any) error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(format, args...), "")
}

func (c *Config) rangePath(i, j int) string {
	if c.legacy && i == 0 && j == 0 {
		return "ipam.subnet"
	}
	return fmt.Sprintf("ipam.ranges[%d][%d]", i, j)
}

func (c *Config) fieldPath(i, j int, field string) string {
	if c.legacy && i == 0 && j == 0 {
		return "ipam." + field
	}
	return fmt.Sprintf("ipam.ranges[%d][%d].%s", i, j, field)
}

// Validate fills defaults (rangeStart: first host after the network address; rangeEnd:
// last usable address, i.e. broadcast-1 for IPv4 and the last address for IPv6; gateway:
// first host; dataDir: DefaultDataDir) and checks the config. It is idempotent. Errors
// are *types.Error with code types.ErrInvalidNetworkConfig naming the field path.
func (c *Config) Validate() error {
	if c.legacyOrphan != "" {
		return invalid("ipam.%s: set without ipam.subnet", c.legacyOrphan)
	}
	if c.Type != "" && c.Type != PluginType {
		return invalid("ipam.type: %q is not handled by the qoscni allocator", c.Type)
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	} else if !filepath.IsAbs(c.DataDir) {
		return invalid("ipam.dataDir: %q is not an absolute path", c.DataDir)
	}
	if len(c.Ranges) == 0 {
		return invalid("ipam.ranges: at least one range set is required")
	}
	type seen struct {
		i, j int
		s    span
	}
	var all []seen
	for i, set := range c.Ranges {
		if len(set) == 0 {
			return invalid("ipam.ranges[%d]: range set is empty", i)
		}
		for j := range set {
			s, err := c.canonicalize(i, j)
			if err != nil {
				return err
			}
			if j > 0 {
				first := all[len(all)-j].s
				if first.prefix.Addr().Is4() != s.prefix.Addr().Is4() {
					return invalid("%s: %s is %s but %s is %s, a range set holds one family",
						c.fieldPath(i, j, "subnet"), s.prefix, family(s.prefix.Addr()),
						c.fieldPath(i, 0, "subnet"), family(first.prefix.Addr()))
				}
			}
			for _, o := range all {
				if o.s.overlaps(s) {
					return invalid("%s: %s overlaps %s (%s)", c.rangePath(i, j), s.interval(),
						c.rangePath(o.i, o.j), o.s.interval())
				}
			}
			all = append(all, seen{i, j, s})
		}
	}
	for k, r := range c.Routes {
		if r == nil {
			return invalid("ipam.routes[%d]: empty route", k)
		}
		if r.Dst.IP == nil || r.Dst.Mask == nil {
			return invalid("ipam.routes[%d].dst: missing", k)
		}
	}
	return c.applyAssign()
}

// applyAssign drops the range sets of a family whose assign_ipv4 or
// assign_ipv6 is false. It runs after the checks, so errors above name the
// range sets by the indexes the user wrote; dropping again finds nothing.
func (c *Config) applyAssign() error {
	v4, err := flexBool("ipam.assign_ipv4", c.AssignIPv4)
	if err != nil {
		return err
	}
	v6, err := flexBool("ipam.assign_ipv6", c.AssignIPv6)
	if err != nil {
		return err
	}
	kept := c.Ranges[:0:0]
	for _, set := range c.Ranges {
		is4 := set[0].Subnet.IP.To4() != nil
		if (is4 && v4) || (!is4 && v6) {
			kept = append(kept, set)
		}
	}
	if len(kept) == 0 {
		return invalid("ipam.assign_ipv4 and ipam.assign_ipv6 leave none of the %d range sets", len(c.Ranges))
	}
	c.Ranges = kept
	return nil
}

// flexBool reads a Calico-style boolean: absent = true.
func flexBool(field string, raw json.RawMessage) (bool, error) {
	if len(raw) == 0 {
		return true, nil
	}
	var b bool
	if json.Unmarshal(raw, &b) == nil {
		return b, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch strings.ToLower(strings.TrimSpace(s)) {
		case "true":
			return true, nil
		case "false":
			return false, nil
		}
	}
	return false, invalid("%s: %s is not true or false", field, raw)
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// canonicalize checks Ranges[i][j], writes its defaults back and returns its netip form.
func (c *Config) canonicalize(i, j int) (span, error) {
	r := &c.Ranges[i][j]
	if r.Subnet.IP == nil || r.Subnet.Mask == nil {
		return span{}, invalid("%s: missing", c.fieldPath(i, j, "subnet"))
	}
	sub := (*net.IPNet)(&r.Subnet)
	p, err := prefixOf(sub)
	if err != nil {
		return span{}, invalid("%s: %s: %v", c.fieldPath(i, j, "subnet"), sub, err)
	}
	if p.Masked() != p {
		return span{}, invalid("%s: %s has host bits set (network is %s)", c.fieldPath(i, j, "subnet"), p, p.Masked())
	}
	// A smaller subnet has no address left after skipping network, gateway and broadcast.
	if maxBits := p.Addr().BitLen() - 2; p.Bits() > maxBits {
		return span{}, invalid("%s: %s is too small (at most /%d for %s)", c.fieldPath(i, j, "subnet"), p, maxBits, family(p.Addr()))
	}
	s := newSpan(p)

	inside := func(field string, ip net.IP, def netip.Addr) (netip.Addr, error) {
		if ip == nil {
			return def, nil
		}
		a, ok := addrOf(ip)
		if !ok {
			return netip.Addr{}, invalid("%s: %s is not an IP address", c.fieldPath(i, j, field), ip)
		}
		if !p.Contains(a) {
			return netip.Addr{}, invalid("%s: %s is outside subnet %s", c.fieldPath(i, j, field), a, p)
		}
		return a, nil
	}
	defEnd := lastAddr(p)
	if p.Addr().Is4() {
		defEnd = defEnd.Prev()
	}
	if s.start, err = inside("rangeStart", r.RangeStart, s.network.Next()); err != nil {
		return span{}, err
	}
	if s.end, err = inside("rangeEnd", r.RangeEnd, defEnd); err != nil {
		return span{}, err
	}
	if s.gateway, err = inside("gateway", r.Gateway, s.network.Next()); err != nil {
		return span{}, err
	}
	if s.start.Compare(s.end) > 0 {
		return span{}, invalid("%s: %s is after rangeEnd %s", c.fieldPath(i, j, "rangeStart"), s.start, s.end)
	}
	r.Subnet = types.IPNet{IP: s.network.AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	r.RangeStart = s.start.AsSlice()
	r.RangeEnd = s.end.AsSlice()
	r.Gateway = s.gateway.AsSlice()
	return s, nil
}
