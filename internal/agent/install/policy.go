package install

import "fmt"

// NetworkPolicy settings of install's --network-policy: whether the
// standalone network's qoscni entry enforces Kubernetes NetworkPolicy
// (its "policy": {"type": "k8s"}, docs/networkpolicy.md).
const (
	// PolicyOwn leaves the config's own "policy" key.
	PolicyOwn = ""
	// PolicyK8s writes "policy": {"type": "k8s"}: the agent enforces.
	PolicyK8s = "k8s"
	// PolicyOff removes the "policy" key: nothing is enforced by qoscni
	// (another engine, or none, owns NetworkPolicy on the node).
	PolicyOff = "off"
)

// ParseNetworkPolicy checks --network-policy.
func ParseNetworkPolicy(s string) (string, error) {
	switch s {
	case PolicyOwn, PolicyK8s, PolicyOff:
		return s, nil
	}
	return "", fmt.Errorf("--network-policy: %q is not %s, %s or empty (the config's own)", s, PolicyK8s, PolicyOff)
}

// setPolicy writes p into a standalone network's qoscni entry.
func setPolicy(entry object, p string) {
	switch p {
	case PolicyK8s:
		entry["policy"] = object{"type": PolicyK8s}
	case PolicyOff:
		delete(entry, "policy")
	}
}
