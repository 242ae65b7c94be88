#!/usr/bin/env bash
# ADD/DEL latency of qoscni against the reference chain (bridge + host-local +
# portmap + bandwidth from /usr/lib/cni), at several pod populations, in one
# run. Prints a markdown table for docs/benchmarks.md.
#
# Every (population, plugin) run gets a fresh node netns and fresh IPAM,
# state and libcni cache dirs; the two plugins alternate at each population
# so drift on the machine hits both alike.
#
# Environment:
#   POPULATIONS="1 100 500"  pods present while measuring
#   CYCLES=30                measured ADD+DEL cycles per run
#   PARALLEL=4               concurrent ADD/DEL while filling/draining (not timed)
#   FAMILIES=4|dual          address families for BOTH plugins (default 4, as
#                            the reference chain is specified v4-only)
#   PLUGINS="qoscni ref"     which to run
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

POPULATIONS=${POPULATIONS:-1 100 500}
CYCLES=${CYCLES:-30}
PARALLEL=${PARALLEL:-4}
FAMILIES=${FAMILIES:-4}
PLUGINS=${PLUGINS:-qoscni ref}
NODE=qoscni-bench-node
SETTLE=${SETTLE:-3} # seconds for the kernel to reap the last run's namespaces
PREFIX=qcb$$        # pod netns names: $PREFIX-<tool pid>-<n>

require_root
WORK=$(mktemp -d /tmp/qoscni-bench.XXXXXX)
# The plugin registers each stateDir for the agent; these are throw-away.
export QOSCNI_STATE_REGISTRY=$WORK/statedirs
cleanup() {
	netns_gone "$NODE"
	# Pod namespaces of a killed tool (it removes its own otherwise).
	for ns in $(ip netns list | awk -v p="^$PREFIX-" '$1 ~ p {print $1}'); do netns_gone "$ns"; done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

case $PLUGINS in *qoscni*) build_bins qoscni ;; esac
build_bins qoscni-cnitool

# conflist PLUGIN DIR: write DIR/conflist for one run.
conflist() {
	local plugin=$1 dir=$2 v6q="" v6r=""
	if [ "$FAMILIES" = dual ]; then
		v6q=',[{"subnet":"fd00:22::/64"}]'
		v6r=',[{"subnet":"fd00:23::/64"}]'
	fi
	case $plugin in
	qoscni)
		cat >"$dir/conflist" <<-EOF
		{"cniVersion":"1.1.0","name":"qoscni","plugins":[{"type":"qoscni","bridge":"qoscni0",
		 "isGateway":true,"isDefaultGateway":true,"ipMasq":true,"mtu":1500,"hairpinMode":true,
		 "stateDir":"$dir/state",
		 "ipam":{"type":"qoscni","ranges":[[{"subnet":"10.22.0.0/16"}]$v6q],"dataDir":"$dir/ipam"},
		 "capabilities":{"portMappings":true,"bandwidth":true,"io.kubernetes.cri.pod-annotations":true}}]}
		EOF
		echo "$QOSCNI_ROOT/bin:$REF_CNI_DIR"
		;;
	ref)
		# cniVersion 1.0.0: the newest the Debian 12 reference plugins (v1.1.1) speak.
		cat >"$dir/conflist" <<-EOF
		{"cniVersion":"1.0.0","name":"refnet","plugins":[
		 {"type":"bridge","bridge":"refbr0","isGateway":true,"isDefaultGateway":true,"ipMasq":true,"hairpinMode":true,
		  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.23.0.0/16"}]$v6r],"dataDir":"$dir/ipam"}},
		 {"type":"portmap","capabilities":{"portMappings":true}},
		 {"type":"bandwidth","capabilities":{"bandwidth":true}}]}
		EOF
		echo "$REF_CNI_DIR"
		;;
	esac
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
for pop in $POPULATIONS; do
	for plugin in $PLUGINS; do
		dir=$WORK/$plugin-$pop
		mkdir -p "$dir"
		cni_path=$(conflist "$plugin" "$dir")
		netns_fresh "$NODE"
		log "$plugin: population $pop, $CYCLES cycles"
		cnitool "$NODE" bench --conflist "$dir/conflist" --cni-path "$cni_path" \
			--cache-dir "$dir/cache" --population "$pop" --cycles "$CYCLES" \
			--parallel "$PARALLEL" --prefix "$PREFIX" --label "$plugin" --format tsv --quiet |
			tee -a "$RESULTS"
		netns_gone "$NODE"
		sleep "$SETTLE"
	done
done

echo
echo "ADD/DEL latency as libcni sees it (ms), $CYCLES cycles per row, families: $FAMILIES," \
	"$(nproc) CPUs, kernel $(uname -r), $(date -u +%Y-%m-%d)"
echo
awk -F'\t' '
BEGIN {
	print "| pods | plugin | ADD p50 | ADD p90 | ADD p99 | DEL p50 | DEL p90 | DEL p99 |"
	print "|-----:|--------|--------:|--------:|--------:|--------:|--------:|--------:|"
}
{
	printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $1, $4, $5, $6, $7, $8, $9
	addp50[$1, $2] = $4; delp50[$1, $2] = $7; pops[$2] = 1; if (!($2 in order)) { order[$2] = ++n; byorder[n] = $2 }
}
END {
	print ""
	print "| pods | ADD p50 ref/qoscni | DEL p50 ref/qoscni |"
	print "|-----:|-------------------:|-------------------:|"
	for (i = 1; i <= n; i++) {
		p = byorder[i]
		ra = (("qoscni", p) in addp50 && ("ref", p) in addp50 && addp50["qoscni", p] > 0) ? sprintf("%.2fx", addp50["ref", p] / addp50["qoscni", p]) : "n/a"
		rd = (("qoscni", p) in delp50 && ("ref", p) in delp50 && delp50["qoscni", p] > 0) ? sprintf("%.2fx", delp50["ref", p] / delp50["qoscni", p]) : "n/a"
		printf "| %s | %s | %s |\n", p, ra, rd
	}
}' "$RESULTS"
