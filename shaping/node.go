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
// returns the minor. On an admission refusal nothing has changed; on any
// other failure of a new member nothing of it stays (a hierarchy made for
// it does, empty).
//
// It reads a few classes by handle (the ledger, hierget.go), not the
// hierarchy: its cost does not grow with the pods on the node. A direction
// whose ledger cannot be read exactly (no hierarchy yet, another
// capacity, requests at or over the capacity) is read whole.
func (s *Shaper) JoinNode(capacity Capacity, g Guarantee, minor uint16, hostVeth string, ips []net.IP) (uint16, error) {
	type side struct {
		ifb               int
		ensure            bool   // no hierarchy at this capacity yet
		reserved, wantRes uint64 // bytes/s, before and after
	}
	sides := map[HierDirection]*side{}
	cur := map[HierDirection]HierState{}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		c := g.class(d)
		if c == nil {
			continue
		}
		capBytes := capacity.bits(d) / 8
		l, err := s.readLedger(d)
		if err != nil {
			return 0, err
		}
		sd := &side{ifb: l.ifb, reserved: l.reservedBytes, ensure: l.capacityBytes != capBytes}
		var own HierClass
		var have bool
		if l.ok && !sd.ensure {
			if own, have, err = s.ownClass(l.ifb, minor); err != nil {
				return 0, err
			}
		} else {
			// The slow path: every class.
			st, err := s.readClasses(d)
			if err != nil {
				return 0, err
			}
			sd.reserved = st.ReservedBytes
			own, have = st.Classes[minor]
			have = have && minor != 0
		}
		if have {
			cur[d] = HierState{Classes: map[uint16]HierClass{minor: own}}
		}
		r := sd.reserved - min(sd.reserved, own.Leaf.RateBytes)
		if c.RequestBits > 0 {
			if err := admit(d.String(), capacity.bits(d), r*8, c.RequestBits, c.Claimed); err != nil {
				return 0, err
			}
		}
		sd.wantRes = r + c.RequestBits/8
		sides[d] = sd
	}
	// The hierarchy, at this capacity, before a minor is picked in it.
	for d, sd := range sides {
		if !sd.ensure {
			continue
		}
		if err := s.EnsureHierarchy(d, capacity.bits(d)/8, sd.reserved); err != nil {
			return 0, fmt.Errorf("set up the node's %s hierarchy: %w", d, err)
		}
		ifb, err := s.linkOrNil(d.IFB())
		if err != nil {
			return 0, err
		}
		sd.ifb = linkIndex(ifb)
	}
	ifbs := map[HierDirection]int{}
	for d, sd := range sides {
		ifbs[d] = sd.ifb
	}
	isNew := minor == 0
	if isNew {
		// Free in both directions, also one this pod has no class in.
		for _, d := range []HierDirection{IntoPods, OutOfPods} {
			if _, ok := ifbs[d]; ok {
				continue
			}
			ifb, err := s.linkOrNil(d.IFB())
			if err != nil {
				return 0, err
			}
			ifbs[d] = linkIndex(ifb)
		}
		m, err := s.pickMinor(hostVeth, ifbs[IntoPods], ifbs[OutOfPods])
		if err != nil {
			return 0, err
		}
		minor = m
	}
	// More reserved: the share shrinks before the class is made; less:
	// after it is changed (so the share never says more is free than is).
	setShares := func(grow bool) error {
		for d, sd := range sides {
			if (sd.wantRes > sd.reserved) == grow && sd.wantRes != sd.reserved {
				if err := s.setBestEffort(d, sd.ifb, capacity.bits(d)/8, sd.wantRes); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := setShares(true); err != nil {
		return 0, err
	}
	if err := s.join(g.Member(minor, hostVeth, ips), cur, ifbs); err != nil {
		if isNew {
			// Undo: the classes made so far, and the shares.
			errs := []error{err, s.Leave(minor, hostVeth, ips)}
			for d, sd := range sides {
				errs = append(errs, s.setBestEffort(d, sd.ifb, capacity.bits(d)/8, sd.reserved))
			}
			return 0, errors.Join(errs...)
		}
		return 0, err
	}
	if err := setShares(false); err != nil {
		return minor, err
	}
	return minor, nil
}

// LeaveNode takes the pod out and gives its request back to best effort.
// ips are the addresses it joined with (its entries are deleted by handle;
// nil: found in a dump). Idempotent.
func (s *Shaper) LeaveNode(minor uint16, hostVeth string, ips []net.IP) error {
	var errs []error
	owns := map[HierDirection]uint64{}
	for _, d := range []HierDirection{IntoPods, OutOfPods} {
		ifb, err := s.linkOrNil(d.IFB())
		if err != nil || ifb == nil {
			errs = append(errs, err)
			continue
		}
		own, ok, err := s.ownClass(ifb.Attrs().Index, minor)
		if err != nil {
			errs = append(errs, err)
		} else if ok {
			owns[d] = own.Leaf.RateBytes
		}
	}
	errs = append(errs, s.Leave(minor, hostVeth, ips))
	for d, own := range owns {
		if own == 0 {
			continue
		}
		l, err := s.readLedger(d)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if l.capacityBytes == 0 {
			continue
		}
		reserved := l.reservedBytes - min(l.reservedBytes, own)
		if !l.ok {
			// At or over the capacity: count what is left.
			st, err := s.readClasses(d)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			reserved = st.ReservedBytes
		}
		errs = append(errs, s.setBestEffort(d, l.ifb, l.capacityBytes, reserved))
	}
	return errors.Join(errs...)
}
