#!/usr/bin/env bash
# Pod routes across nodes (host-gw): time from a Node object appearing (a
# fake clientset's Create) to its IPv4 and IPv6 routes in the kernel (a
# netlink route subscription in the node netns), NODES peers, one at a
# time and in a burst; then pod-to-pod iperf3 throughput across two nodes
# (namespaces on one bridge, pods made by the plugin) over the agent's
# routes against the same routes added by hand, runs alternating; then
# the same over VXLAN (mode auto, two nodes behind a router: the agent's
# qoscni.vx device, routes, neighbour and FDB entries against the same
# made by hand with ip/bridge, pod MTU 1450).
# The code is nodenet.TestBenchNodeRoutes (it reuses the kernel tests'
# cluster). Prints markdown tables for docs/benchmarks.md.
#
# Environment:
#   NODES=200    peers for the latency runs
#   GAP_MS=150   spacing of the one-at-a-time arrivals (> the 100 ms
#                minimum between passes, so each arrival is served alone)
#   RUNS=3       iperf3 runs per kind of route
#   SECS=5       seconds per iperf3 run (plus 1 omitted)
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

require_root
command -v iperf3 >/dev/null || die "iperf3 not installed (apt-get install iperf3)"
cd "$QOSCNI_ROOT"
export QOSCNI_BENCH_NODEROUTES=1 QOSCNI_REQUIRE_ROOT=1 NODES=${NODES:-200} GAP_MS=${GAP_MS:-150} RUNS=${RUNS:-3} SECS=${SECS:-5}
log "nodenet benchmark: $NODES nodes, $RUNS x ${SECS}s iperf3 ($(nproc) CPUs, $(uname -r), $(date -u +%Y-%m-%d))"
OUT=$(mktemp /tmp/qoscni-noderoutes.XXXXXX)
trap 'rm -f "$OUT"' EXIT
if ! go test -count=1 -timeout 30m -run '^TestBenchNodeRoutes$' -v ./internal/agent/nodenet >"$OUT" 2>&1; then
	cat "$OUT" >&2
	die "benchmark failed"
fi
grep -E '^(\||## |ratio|$)' "$OUT" | cat -s
