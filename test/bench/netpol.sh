#!/usr/bin/env bash
# NetworkPolicy enforcement latency (issue 22): PODS pods on one node
# (records and a fake API), BACKGROUND policies in place, then CHANGES
# policies created and deleted through the API, each timed from the API
# call to the node's nftables holding the change. The code is
# netpol.TestBenchPolicyChange. Prints a markdown table for
# docs/benchmarks.md.
#
# Environment: PODS=500, BACKGROUND=50, CHANGES=40.
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

require_root
cd "$QOSCNI_ROOT"
export QOSCNI_BENCH_NETPOL=1 QOSCNI_REQUIRE_ROOT=1 PODS=${PODS:-500} BACKGROUND=${BACKGROUND:-50} CHANGES=${CHANGES:-40}
log "NetworkPolicy benchmark: $PODS pods, $BACKGROUND policies, $CHANGES changes ($(nproc) CPUs, $(uname -r), $(date -u +%Y-%m-%d))"
OUT=$(mktemp /tmp/qoscni-netpol.XXXXXX)
trap 'rm -f "$OUT"' EXIT
if ! go test -count=1 -timeout 30m -run '^TestBenchPolicyChange$' -v ./internal/agent/netpol >"$OUT" 2>&1; then
	cat "$OUT" >&2
	die "benchmark failed"
fi
grep -E '^(\||initial|    bench_test)' "$OUT" | cat -s
