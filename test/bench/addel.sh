#!/usr/bin/env bash
# ADD/DEL latency of qoscni against the reference chains (bridge + host-local
# + portmap + bandwidth: Debian's v1.1.1 from /usr/lib/cni, and v1.10.0 with
# portmap's and bridge's nftables backends, built by test/e2e/build.sh), at
# several pod populations, in one run. Prints a markdown table for
# docs/benchmarks.md.
#
# Every (population, plugin) run gets a fresh node netns and fresh IPAM,
# state and libcni cache dirs; the two plugins alternate at each population
# so drift on the machine hits both alike.
#
# Environment:
#   POPULATIONS="1 100 500"  pods present while measuring
#   CYCLES=30                measured ADD+DEL cycles per run
#   PARALLEL=4               concurrent ADD/DEL while filling/draining (not timed)
#   FILL_SETTLE=10s          pause after the fill before the measured cycles:
#                            the kernel's own work for the interfaces just made
#                            (IPv6 DAD, router solicitations) ends first
#   FAMILIES=4|dual          address families for BOTH plugins (default 4, as
#                            the reference chain is specified v4-only)
#   PLUGINS="qoscni ref ref110"  which to run (ref: Debian's v1.1.1; ref110:
#                            v1.10.0, nftables backends)
#   WORKLOAD=mapped|plain    mapped (default): every pod has a TCP hostPort
#                            and a bandwidth limit both ways (100 Mbit/s,
#                            1 Mbit bursts); plain: neither, as a pod without
#                            annotations or ports
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

POPULATIONS=${POPULATIONS:-1 100 500}
CYCLES=${CYCLES:-30}
PARALLEL=${PARALLEL:-4}
FAMILIES=${FAMILIES:-4}
PLUGINS=${PLUGINS:-qoscni ref ref110}
WORKLOAD=${WORKLOAD:-mapped}
FILL_SETTLE=${FILL_SETTLE:-10s}
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
REF110_PATH=""
case $PLUGINS in *ref110*)
	"$QOSCNI_ROOT/test/e2e/build.sh" cni-bridge cni-host-local cni-portmap cni-bandwidth >&2
	for c in cni-bridge cni-host-local cni-portmap cni-bandwidth; do
		REF110_PATH=$REF110_PATH${REF110_PATH:+:}$(dirname "$("$QOSCNI_ROOT/test/e2e/build.sh" --path "$c")")
	done
	;;
esac
case $WORKLOAD in
mapped) WORKLOAD_ARGS=(--hostport-base 20000 --cap-args
	'{"bandwidth":{"ingressRate":100000000,"ingressBurst":1000000,"egressRate":100000000,"egressBurst":1000000}}') ;;
plain) WORKLOAD_ARGS=() ;;
*) die "WORKLOAD=$WORKLOAD: want mapped or plain" ;;
esac

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
	ref110)
		cat >"$dir/conflist" <<-EOF
		{"cniVersion":"1.1.0","name":"ref110net","plugins":[
		 {"type":"bridge","bridge":"refbr1","isGateway":true,"isDefaultGateway":true,"ipMasq":true,"ipMasqBackend":"nftables","hairpinMode":true,
		  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.24.0.0/16"}]$v6r],"dataDir":"$dir/ipam"}},
		 {"type":"portmap","backend":"nftables","capabilities":{"portMappings":true}},
		 {"type":"bandwidth","capabilities":{"bandwidth":true}}]}
		EOF
		echo "$REF110_PATH"
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
			--parallel "$PARALLEL" --prefix "$PREFIX" --label "$plugin" --format tsv --quiet --settle "$FILL_SETTLE" "${WORKLOAD_ARGS[@]}" |
			tee -a "$RESULTS"
		netns_gone "$NODE"
		sleep "$SETTLE"
	done
done

echo
echo "ADD/DEL latency as libcni sees it (ms), workload $WORKLOAD, $CYCLES cycles per row, families: $FAMILIES," \
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
	print "| pods | ADD p50 ref/qoscni | DEL p50 ref/qoscni | ADD p50 ref110/qoscni | DEL p50 ref110/qoscni |"
	print "|-----:|-------------------:|-------------------:|----------------------:|----------------------:|"
	for (i = 1; i <= n; i++) {
		p = byorder[i]
		printf "| %s | %s | %s | %s | %s |\n", p, ratio(addp50, "ref", p), ratio(delp50, "ref", p), ratio(addp50, "ref110", p), ratio(delp50, "ref110", p)
	}
}
function ratio(a, ref, p) {
	return ((("qoscni", p) in a) && ((ref, p) in a) && a["qoscni", p] > 0) ? sprintf("%.2fx", a[ref, p] / a["qoscni", p]) : "n/a"
}' "$RESULTS"
