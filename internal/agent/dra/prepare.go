package dra

import (
	"fmt"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"

	"github.com/qoscni/qoscni/internal/grant"
)

// claimGrant is what one prepared claim gives: the pod it is reserved
// for, its bandwidth per direction, and the devices the kubelet is told
// of.
type claimGrant struct {
	podUID  string
	grant   grant.Grant
	devices []kubeletplugin.Device
}

// grantOf reads claim's allocation on this node: the bandwidth it
// consumes of each of driver's devices in pool (the node's), and the one
// pod it is reserved for. A claim this driver cannot honour is an error
// the kubelet shows on the pod.
func grantOf(claim *resourceapi.ResourceClaim, driver, pool string) (claimGrant, error) {
	name := claim.Namespace + "/" + claim.Name
	var out claimGrant
	out.grant.Claim = name
	if claim.Status.Allocation == nil {
		return out, fmt.Errorf("claim %s is not allocated", name)
	}
	for _, r := range claim.Status.Allocation.Devices.Results {
		if r.Driver != driver {
			continue
		}
		if r.Pool != pool {
			return out, fmt.Errorf("claim %s: device %s/%s is not this node's (pool %s)", name, r.Pool, r.Device, pool)
		}
		q, ok := r.ConsumedCapacity[CapacityName]
		if !ok {
			// Without consumable capacity (DRAConsumableCapacity off on
			// the API server) the device is allocated whole to one claim
			// and the scheduler counted nothing against it.
			return out, fmt.Errorf("claim %s: the allocation of device %s consumes no %q: the cluster runs without consumable capacity (feature gate DRAConsumableCapacity)", name, r.Device, CapacityName)
		}
		bits, ok := q.AsInt64()
		if !ok || bits < 0 {
			return out, fmt.Errorf("claim %s: consumed %s %s is not a whole number of bit/s", name, CapacityName, q.String())
		}
		switch r.Device {
		case Egress:
			out.grant.EgressBits += uint64(bits)
		case Ingress:
			out.grant.IngressBits += uint64(bits)
		default:
			return out, fmt.Errorf("claim %s: device %q is not one of this driver's (%s, %s)", name, r.Device, Egress, Ingress)
		}
		out.devices = append(out.devices, kubeletplugin.Device{Requests: []string{r.Request}, PoolName: r.Pool, DeviceName: r.Device, ShareID: r.ShareID})
	}
	var pods []string
	for _, c := range claim.Status.ReservedFor {
		if c.APIGroup == "" && c.Resource == "pods" {
			pods = append(pods, string(c.UID))
		}
	}
	switch len(pods) {
	case 1:
		out.podUID = pods[0]
	case 0:
		return out, fmt.Errorf("claim %s is reserved for no pod", name)
	default:
		// The kubelet prepares a claim once per node: a second pod sharing
		// it would run without the guarantee the scheduler counted once.
		return out, fmt.Errorf("claim %s is shared by %d pods: a bandwidth claim guarantees one pod; give each pod its own claim with a ResourceClaimTemplate", name, len(pods))
	}
	return out, nil
}
