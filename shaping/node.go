package shaping

import (
	"errors"
	"fmt"
	"net"
)

// What the plugin and the agent do to the node hierarchy for one pod:
// admission, the class minor, the capacity and the best-effort share
// around Join and Leave. The caller holds the node's hierarchy lock
// (plugin.HierarchyLock): admission reads the sum of requests and writes
// a class, and two pods must not both see the same headroom or minor.

// hierLeafOf is a pod class in the kernel's units.
func hierLeafOf(c *Class) *HierLeaf {
	if c == nil {
		return nil
	}
	return &HierLeaf{RateBytes: c.RequestBits / 8, CeilBytes: c.CeilBits / 8, Prio: uint8(c.Priority),
		BurstBytes: c.BurstBytes, CburstBytes: c.CburstBytes, QueueBytes: c.QueueBytes}
}

// Member is the pod's place in the node hierarchy.
func (g Guarantee) Member(minor uint16, hostVeth string, ips []net.IP) HierMember {
	return HierMember{Minor: minor, HostVeth: hostVeth, IPs: ips, Ingress: hierLeafOf(g.Ingress), Egress: hierLeafOf(g.Egress)}
}

func (c Capacity) bits(d HierDirection) uint64 {
	if d == IntoPods {
		return c.IngressBits
	}
	return c.EgressBits
}

func (g Guarantee) class(d HierDirection) *Class {
	if d == IntoPods {
		return g.Ingress
	}
	return g.Egress
}

// JoinNode admits the pod's requests against the capacity, takes a minor
// (when minor is 0) and puts the pod in: on ADD, and on a reshape of a pod
// already in (its own current request is not counted against it). It
// returns the minor. On an admission refusal nothing has changed.
func (s *Shaper) JoinNode(capacity Capacity, g Guarantee, minor uint16, hostVeth string, ips []net.IP) (uint16, error) {
	states, err := s.ReadHierarchies(false)
	if err != nil {
		return 0, err
	}
	reserved := map[HierDirection]uint64{}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		c := g.class(d)
		if c == nil {
			continue
		}
		st := states[d]
		r := st.ReservedBytes * 8
		if own, ok := st.Classes[minor]; ok && minor != 0 && own.Guaranteed {
			r -= own.Leaf.RateBytes * 8
		}
		if c.RequestBits > 0 {
			if err := Admit(d.String(), capacity.bits(d), r, c.RequestBits); err != nil {
				return 0, err
			}
		}
		reserved[d] = r + c.RequestBits
	}
	if minor == 0 {
		m, err := FreeMinor(states[IntoPods], states[OutOfPods])
		if err != nil {
			return 0, err
		}
		minor = m
	}
	for d, r := range reserved {
		capBytes := capacity.bits(d) / 8
		if states[d].CapacityBytes != capBytes {
			if err := s.EnsureHierarchy(d, capBytes, r/8); err != nil {
				return 0, fmt.Errorf("set up the node's %s hierarchy: %w", d, err)
			}
			st, err := s.ReadHierarchy(d)
			if err != nil {
				return 0, err
			}
			states[d] = st
		}
	}
	if err := s.Join(g.Member(minor, hostVeth, ips), states); err != nil {
		return 0, err
	}
	for d, r := range reserved {
		if err := s.SetBestEffort(d, capacity.bits(d)/8, r/8); err != nil {
			return minor, err
		}
	}
	return minor, nil
}

// LeaveNode takes the pod out and gives its request back to best effort.
// Idempotent.
func (s *Shaper) LeaveNode(minor uint16, hostVeth string) error {
	errs := []error{s.Leave(minor, hostVeth)}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		st, err := s.ReadHierarchy(d)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if st.CapacityBytes != 0 {
			errs = append(errs, s.SetBestEffort(d, st.CapacityBytes, st.ReservedBytes))
		}
	}
	return errors.Join(errs...)
}
