// Package portmap implements hostPorts (the CNI portMappings capability)
// with nftables in qoscni's table inet qoscni: fixed chains and rules, and
// per-pod data as elements of concatenated-key maps, so an ADD or DEL is one
// atomic batch and its cost, like a packet's, does not grow with the number
// of mappings. See README.md for the layout, the chain priorities next to
// kube-proxy, and what the plugin calls on ADD, DEL, CHECK and GC.
package portmap
