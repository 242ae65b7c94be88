#!/usr/bin/env bash
# Latency of the hostPort step alone: qoscni's portmap package (in process,
# as the plugin runs it) against the reference portmap plugin (iptables,
# /usr/lib/cni/portmap, exec'd with a CNI 1.0.0 config) at several
# populations of pods that each hold a hostPort, in one run. Also prints the
# number of rules a hostPort packet is evaluated against at each population.
# Prints a markdown table for docs/benchmarks.md.
#
# Every (population, implementation) run gets a fresh node netns; the two
# implementations alternate at each population so machine drift hits both.
#
# Environment:
#   POPULATIONS="1 100 1000"  pods holding a hostPort while measuring
#   CYCLES=30                 measured ADD+DEL cycles per run
#   IMPLS="qoscni ref"        which to run
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

POPULATIONS=${POPULATIONS:-1 100 1000}
CYCLES=${CYCLES:-30}
IMPLS=${IMPLS:-qoscni ref}
NODE=qoscni-pmbench-$$

require_root
[ -x "$REF_CNI_DIR/portmap" ] || die "reference plugin $REF_CNI_DIR/portmap missing (make deps)"
WORK=$(mktemp -d /tmp/qoscni-pmbench.XXXXXX)
# The plugin registers each stateDir for the agent; these are throw-away.
export QOSCNI_STATE_REGISTRY=$WORK/statedirs
cleanup() {
	netns_gone "$NODE"
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

(cd "$QOSCNI_ROOT" && CGO_ENABLED=0 go build -trimpath -o "$WORK/pmbench" ./test/bench/portmap)

RESULTS=$WORK/results.tsv
: >"$RESULTS"
netns_fresh "$NODE"
ip netns exec "$NODE" "$WORK/pmbench" -impl exec -cycles "$CYCLES" -ref "$REF_CNI_DIR/portmap" | tee -a "$RESULTS"
netns_gone "$NODE"
for pop in $POPULATIONS; do
	for impl in $IMPLS; do
		netns_fresh "$NODE"
		log "$impl: population $pop, $CYCLES cycles"
		ip netns exec "$NODE" "$WORK/pmbench" -impl "$impl" -population "$pop" -cycles "$CYCLES" \
			-ref "$REF_CNI_DIR/portmap" -netns "/run/netns/$NODE" | tee -a "$RESULTS"
		netns_gone "$NODE"
	done
done

echo
echo "hostPort step latency (ms), one TCP hostPort per pod, $CYCLES cycles per row," \
	"$(nproc) CPUs, kernel $(uname -r), $(date -u +%Y-%m-%d)"
echo
awk -F'\t' '
$1 == "exec" { execp50 = $4; next }
{
	key = $1 SUBSEP $2; add[key] = $4; del[key] = $7; rules[key] = $10
	row[++n] = $0
	if (!($2 in seenpop)) { seenpop[$2] = 1; pops[++np] = $2 }
}
END {
	print "| pods | impl | ADD p50 | ADD p90 | ADD p99 | DEL p50 | DEL p90 | DEL p99 | rules a hostPort packet meets |"
	print "|-----:|------|--------:|--------:|--------:|--------:|--------:|--------:|------:|"
	for (i = 1; i <= n; i++) {
		split(row[i], f, "\t")
		printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", f[2], f[1], f[4], f[5], f[6], f[7], f[8], f[9], f[10]
	}
	print ""
	first = pops[1]
	print "| pods | ADD p50 ref/qoscni | DEL p50 ref/qoscni | qoscni ADD p50 vs " first " pods | qoscni DEL p50 vs " first " pods |"
	print "|-----:|------:|------:|------:|------:|"
	for (i = 1; i <= np; i++) {
		p = pops[i]
		q = "qoscni" SUBSEP p; r = "ref" SUBSEP p; q1 = "qoscni" SUBSEP first
		ra = (q in add && r in add && add[q] > 0) ? sprintf("%.1fx", add[r] / add[q]) : "n/a"
		rd = (q in del && r in del && del[q] > 0) ? sprintf("%.1fx", del[r] / del[q]) : "n/a"
		ga = (q in add && q1 in add && add[q1] > 0) ? sprintf("%.2fx", add[q] / add[q1]) : "n/a"
		gd = (q in del && q1 in del && del[q1] > 0) ? sprintf("%.2fx", del[q] / del[q1]) : "n/a"
		printf "| %s | %s | %s | %s | %s |\n", p, ra, rd, ga, gd
	}
	print ""
	printf "Exec of the reference binary alone (CNI_COMMAND=VERSION): p50 %s ms; the ref rows include it, the qoscni rows are the in-process step (open netlink sockets, Add/Del, close).\n", execp50
}' "$RESULTS"
