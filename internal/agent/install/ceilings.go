package install

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/qoscni/qoscni/internal/cni/netconf"
)

// CeilingKeys are the keys of the network config's "ceilings" object that
// --ceilings sets, in the order they are written.
var CeilingKeys = []string{"maxBurst", "maxQueueBytes", "maxQueueDelay", "maxRequest"}

// ParseCeilings reads --ceilings: "key=value,..." with the keys of the
// network config's "ceilings" object (README, "Configuration"): maxBurst
// (bits) and maxQueueBytes (bytes) as integers, maxQueueDelay a duration,
// maxRequest a quantity in bit/s. "" sets none. The values are checked as
// the plugin checks them, so a bad one stops the install instead of every
// pod's ADD.
func ParseCeilings(s string) (netconf.CeilingsConfig, error) {
	var c netconf.CeilingsConfig
	s = strings.TrimSpace(s)
	if s == "" {
		return c, nil
	}
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || v == "" {
			return c, fmt.Errorf("--ceilings: %q is not key=value", kv)
		}
		if seen[k] {
			return c, fmt.Errorf("--ceilings: %s given twice", k)
		}
		seen[k] = true
		switch k {
		case "maxBurst", "maxQueueBytes":
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil || n == 0 {
				return c, fmt.Errorf("--ceilings: %s=%q is not a positive integer (%s)", k, v, map[string]string{"maxBurst": "bits", "maxQueueBytes": "bytes"}[k])
			}
			if k == "maxBurst" {
				c.MaxBurst = n
			} else {
				c.MaxQueueBytes = n
			}
		case "maxQueueDelay":
			c.MaxQueueDelay = v
		case "maxRequest":
			c.MaxRequest = v
		default:
			return c, fmt.Errorf("--ceilings: %q is not one of %s", k, strings.Join(CeilingKeys, ", "))
		}
	}
	if err := c.Check(); err != nil {
		return c, fmt.Errorf("--ceilings: %w", err)
	}
	return c, nil
}

// setCeilings writes the ceilings given into qoscni's entry, over the
// config's own keys of the same names; the config's other keys stay.
func setCeilings(entry object, c netconf.CeilingsConfig) {
	if c == (netconf.CeilingsConfig{}) {
		return
	}
	ceil, _ := entry["ceilings"].(object)
	if ceil == nil {
		ceil = object{}
	}
	for k, v := range map[string]any{"maxBurst": c.MaxBurst, "maxQueueBytes": c.MaxQueueBytes, "maxQueueDelay": c.MaxQueueDelay, "maxRequest": c.MaxRequest} {
		if v != uint64(0) && v != "" {
			ceil[k] = v
		}
	}
	entry["ceilings"] = ceil
}
