// Package dra makes qoscni-agent a Dynamic Resource Allocation driver whose
// devices are the node's guaranteed bandwidth, so that the Kubernetes
// scheduler places pods by the bandwidth they claim (KEP-5075, consumable
// capacity).
//
// The agent publishes one ResourceSlice for its node with a device per
// direction, "egress" and "ingress", each shareable by many claims
// (allowMultipleAllocations) and carrying one capacity, "bandwidth", in
// bit/s: the node capacity of qoscni's network. The scheduler keeps the sum
// of the claims' consumed bandwidth within it. When the kubelet prepares a
// claim for a pod, the driver writes the consumed bandwidth as the pod's
// grant (internal/grant), which CNI ADD and the agent's reshape take as the
// pod's guaranteed request; unprepare removes it.
package dra

import (
	"fmt"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"

	"github.com/qoscni/qoscni/shaping"
)

// DefaultDriverName is the driver's name: its DeviceClasses select it, and
// it names the kubelet plugin's sockets.
const DefaultDriverName = "bandwidth.qoscni.io"

// Names in the ResourceSlice.
const (
	// CapacityName is each device's consumable capacity, bit/s.
	CapacityName = "bandwidth"
	// DirectionAttribute is "egress" (out of pods) or "ingress" (into them).
	DirectionAttribute = "direction"
	Egress             = "egress"
	Ingress            = "ingress"
)

// Policy is the request policy of the devices' capacity, bit/s: a claim
// that names no amount consumes Default; amounts are rounded up to
// Min + k*Step and may not exceed Max (0: the capacity).
type Policy struct {
	DefaultBits, MinBits, StepBits, MaxBits uint64
}

// DefaultPolicy is the agent's flags' defaults: whole Mbit/s from 1 Mbit/s,
// 10 Mbit/s when a claim names no amount.
var DefaultPolicy = Policy{DefaultBits: 10e6, MinBits: 1e6, StepBits: 1e6}

// Check reports a policy the API server would refuse on any node.
func (p Policy) Check() error {
	switch {
	case p.StepBits == 0:
		return fmt.Errorf("request step must be above 0")
	case p.DefaultBits < p.MinBits:
		return fmt.Errorf("default request %d bit/s is below the minimum %d", p.DefaultBits, p.MinBits)
	case (p.DefaultBits-p.MinBits)%p.StepBits != 0:
		return fmt.Errorf("default request %d bit/s is not the minimum %d plus a multiple of the step %d", p.DefaultBits, p.MinBits, p.StepBits)
	case p.MaxBits != 0 && p.MaxBits < p.DefaultBits:
		return fmt.Errorf("maximum request %d bit/s is below the default %d", p.MaxBits, p.DefaultBits)
	}
	return nil
}

// Devices are the node's bandwidth devices: one per direction whose
// capacity is set. maxRequestBits is the network's ceilings.maxRequest
// (0: none), which bounds a claim as it bounds an annotation.
func Devices(c shaping.Capacity, maxRequestBits uint64, p Policy) []resourceapi.Device {
	var out []resourceapi.Device
	for _, d := range []struct {
		name string
		bits uint64
	}{{Egress, c.EgressBits}, {Ingress, c.IngressBits}} {
		if d.bits == 0 {
			continue
		}
		dc := resourceapi.DeviceCapacity{Value: *quantity(d.bits), RequestPolicy: requestPolicy(d.bits, maxRequestBits, p)}
		out = append(out, resourceapi.Device{
			Name: d.name,
			Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
				DirectionAttribute: {StringValue: ptr.To(d.name)},
			},
			Capacity:                 map[resourceapi.QualifiedName]resourceapi.DeviceCapacity{CapacityName: dc},
			AllowMultipleAllocations: ptr.To(true),
		})
	}
	return out
}

// requestPolicy fits p to a device of capBits: the largest valid amount
// is the capacity (or the network's maxRequest, or p's maximum, whichever
// is lowest) rounded down to a step, and the default is at most that. A
// capacity too small for one step has no policy: a claim then takes the
// whole device.
func requestPolicy(capBits, maxRequestBits uint64, p Policy) *resourceapi.CapacityRequestPolicy {
	top := capBits
	for _, m := range []uint64{maxRequestBits, p.MaxBits} {
		if m != 0 && m < top {
			top = m
		}
	}
	if p.StepBits == 0 || top < p.MinBits+p.StepBits {
		return nil
	}
	top = p.MinBits + (top-p.MinBits)/p.StepBits*p.StepBits
	def := min(p.DefaultBits, top)
	return &resourceapi.CapacityRequestPolicy{
		Default: quantity(def),
		ValidRange: &resourceapi.CapacityRequestPolicyRange{
			Min: quantity(p.MinBits), Max: quantity(top), Step: quantity(p.StepBits),
		},
	}
}

func quantity(bits uint64) *resource.Quantity {
	return resource.NewQuantity(int64(min(bits, 1<<62)), resource.DecimalSI)
}
