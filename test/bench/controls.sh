#!/usr/bin/env bash
# Cost of the packet-rate, connection and DSCP controls at several
# populations of pods that hold them (test/bench/controls): one pod's Set
# (what ADD adds) and Del, as the plugin runs them, and the rule count of
# qoscni's table. No other CNI plugin with these controls runs here (Calico
# needs its own datapath), so the figures are ratios against one pod in the
# same run. Prints a markdown table for docs/benchmarks.md.
#
# Environment:
#   POPULATIONS="1 100 1000"  pods holding controls while measuring
#   CYCLES=30                 measured Set+Del cycles per row
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

POPULATIONS=${POPULATIONS:-1 100 1000}
CYCLES=${CYCLES:-30}
NODE=qoscni-ctlbench-$$

require_root
WORK=$(mktemp -d /tmp/qoscni-ctlbench.XXXXXX)
cleanup() {
	netns_gone "$NODE"
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

(cd "$QOSCNI_ROOT" && CGO_ENABLED=0 go build -trimpath -o "$WORK/ctlbench" ./test/bench/controls)

RESULTS=$WORK/results.tsv
: >"$RESULTS"
for pop in $POPULATIONS; do
	netns_fresh "$NODE"
	log "population $pop, $CYCLES cycles"
	ip netns exec "$NODE" "$WORK/ctlbench" -population "$pop" -cycles "$CYCLES" | tee -a "$RESULTS"
	netns_gone "$NODE"
done

echo
echo "controls step latency (ms): every control in both directions and a DSCP, IPv4 and IPv6," \
	"$CYCLES cycles per row, $(nproc) CPUs, kernel $(uname -r), $(date -u +%Y-%m-%d)"
echo
awk -F'\t' '
NR == 1 { set1 = $3; del1 = $6 }
{ row[NR] = $0 }
END {
	print "| pods | Set p50 | Set p90 | Set p99 | Del p50 | Del p90 | Del p99 | of which closing the socket, p50 | rules in the table | Set p50 vs first row | Del p50 vs first row |"
	print "|-----:|--------:|--------:|--------:|--------:|--------:|--------:|------:|------:|------:|------:|"
	for (i = 1; i <= NR; i++) {
		split(row[i], f, "\t")
		printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %.2fx | %.2fx |\n", f[1], f[3], f[4], f[5], f[6], f[7], f[8], f[10], f[9], f[3] / set1, f[6] / del1
	}
}' "$RESULTS"
