// Package controls keeps the per-pod controls tc cannot express in
// nftables: a packet rate per direction, a bound on concurrent
// connections per direction, and the DSCP of the pod's egress.
//
// Everything lives in qoscni's table (inet qoscni) beside the hostPort
// chains. A pod is its addresses: in standalone mode its traffic reaches
// the IP hooks through the bridge (br_netfilter), where the input device
// is the bridge and not the pod's veth, so the veth cannot key anything.
// Each control is one element per pod address in a set, and the element
// carries the pod's own stateful expressions:
//
//	pkt-{egress,ingress}{4,6}       counter, limit rate over N/second burst B packets
//	pkt-drop-{egress,ingress}{4,6}  counter
//	conn-{egress,ingress}{4,6}      ct count over N, counter
//	dscp{4,6}                       verdict map: jump dscp-N
//
// A lookup evaluates the element's expressions in order and matches only
// when they all pass, so the rules are fixed (a lookup and a drop or
// reject each). A packet rate's counter counts every packet its limit
// meets; the limit then matches only packets over the rate, and for those
// the rule looks up the drop set, whose counter counts exactly the drops.
// A connection bound's counter follows its ct count, so it counts the
// connections refused. The
// connection sets are not dynamic: the kernel garbage-collects a dynamic
// set's element whose connection count falls to 0, which would lift the
// pod's limit. DSCP is written by one small chain per code point in use
// (at most 64), chosen by the verdict map.
//
// Adding or changing a pod is one transaction that replaces its elements;
// the rule count does not grow with pods.
package controls
