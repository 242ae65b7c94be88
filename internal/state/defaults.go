package state

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// UnmarshalJSON reads ShapingDefaults, also in the form plugins before
// MaxQueueDelayNs wrote: the config's maxQueueDelay string. Records on
// disk outlive an upgrade of the plugin, and the agent reshapes from them.
func (d *ShapingDefaults) UnmarshalJSON(b []byte) error {
	type plain ShapingDefaults // without this method
	var v struct {
		plain
		Legacy *string `json:"maxQueueDelay"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*d = ShapingDefaults(v.plain)
	if v.Legacy == nil || *v.Legacy == "" || d.MaxQueueDelayNs != 0 {
		return nil
	}
	// Trimmed as the plugin trimmed it when it accepted the config.
	delay, err := time.ParseDuration(strings.TrimSpace(*v.Legacy))
	if err != nil {
		return fmt.Errorf("shapingDefaults.maxQueueDelay %q: not a Go duration", *v.Legacy)
	}
	d.MaxQueueDelayNs = int64(delay)
	return nil
}
