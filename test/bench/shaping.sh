#!/usr/bin/env bash
# Shaping accuracy and queueing delay of qoscni against the reference
# bandwidth plugin (/usr/lib/cni/bandwidth), same pod, same inputs, one run.
# Prints markdown tables for docs/benchmarks.md (issue 3).
#
# Both shapers act on the same kind of pod: wired by the reference bridge
# plugin + host-local, then either qoscni chained
#   {"type":"qoscni","capabilities":{"bandwidth":true,"io.kubernetes.cri.pod-annotations":true}}
# or the reference {"type":"bandwidth","capabilities":{"bandwidth":true}},
# cniVersion 1.0.0 for both (the newest the Debian reference plugins speak),
# driven through libcni by bin/qoscni-cnitool. The capability args are what
# containerd sends for a pod annotated kubernetes.io/{ingress,egress}-bandwidth:
# the annotations, and runtimeConfig.bandwidth with those rates and its
# 4294967295-bit bursts.
#
# Directions: "ingress" = into the pod (iperf3 client in the node netns sends
# to the server in the pod), "egress" = out of the pod (iperf3 -R).
#
# Per (rate, direction) both pods are added fresh (full token buckets), then
# RUNS steady runs per plugin, alternating which plugin goes first, then one
# RTT run per plugin:
#   goodput      receiver's rate over DURATION s after OMIT s (iperf3 -O),
#                median of RUNS, divided by the configured rate (raw ratio: a
#                perfect frame-counting shaper gives 1448/1514 = 0.956);
#   first second receiver's first 1 s interval of run 1 / rate;
#   RTT          ping -i 0.05 from the node to the pod while one bulk TCP flow
#                saturates the direction (ingress: the probes queue behind it;
#                egress: the replies do), p50/p99 of the answered probes.
# An unshaped pod (bridge only) gives the baseline at the top; rows whose
# rate is above it are marked "not measurable here".
#
# Environment:
#   RATES="1M 10M 100M 1G"  rates (Kubernetes quantities, bit/s)
#   RUNS=3                  steady runs per cell (median)
#   DURATION=6 OMIT=2       iperf3 -t and -O of a steady run, seconds
#   PROBES=100              RTT probes (every 50 ms)
#   DIRS="ingress egress"   PLUGINS="qoscni ref"
#   QUICK=1                 RATES="10M 100M" RUNS=1 DURATION=4 PROBES=40 unless set
#   RAW_DIR=DIR             keep the raw iperf3 JSON / ping output there
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

if [ "${QUICK:-0}" = 1 ]; then
	: "${RATES:=10M 100M}" "${RUNS:=1}" "${DURATION:=4}" "${PROBES:=40}"
fi
RATES=${RATES:-1M 10M 100M 1G}
RUNS=${RUNS:-3}
DURATION=${DURATION:-6}
OMIT=${OMIT:-2}
PROBES=${PROBES:-100}
DIRS=${DIRS:-ingress egress}
PLUGINS=${PLUGINS:-qoscni ref}
RUNTIME_BURST=4294967295 # bits: what containerd sends for every shaped pod

NODE=qshb-node-$$
POD_Q=qshb-$$-q # qoscni-shaped pod
POD_R=qshb-$$-r # reference-shaped pod
POD_B=qshb-$$-b # unshaped baseline pod

require_root
for t in iperf3 ping jq tc; do command -v "$t" >/dev/null || die "$t missing (make deps; apt-get install jq)"; done
for p in bridge host-local bandwidth; do
	[ -x "$REF_CNI_DIR/$p" ] || die "reference plugin $REF_CNI_DIR/$p missing (make deps)"
done

WORK=$(mktemp -d /tmp/qoscni-shbench.XXXXXX)
# The plugin registers each stateDir for the agent; these are throw-away.
export QOSCNI_STATE_REGISTRY=$WORK/statedirs
RAW=${RAW_DIR:-$WORK/raw}
mkdir -p "$RAW"
BG_PIDS=() # every background process we started (iperf3 servers, bulk flows)
cleanup() {
	local pid
	for pid in "${BG_PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${BG_PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	# The node netns holds the bridges, host veths and IFBs of both
	# plugins; the pod netns the other veth ends. IPAM, state and the
	# libcni cache live in $WORK.
	for ns in "$POD_Q" "$POD_R" "$POD_B" "$NODE"; do netns_gone "$ns"; done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_bins qoscni qoscni-cnitool
(cd "$QOSCNI_ROOT" && CGO_ENABLED=0 go build -trimpath -o "$WORK/shaping" ./test/bench/shaping)

# rate_bits LABEL: a decimal Kubernetes quantity (k, M, G, T) in bit/s.
rate_bits() {
	awk -v q="$1" 'BEGIN {
		if (!match(q, /^[0-9]+(\.[0-9]+)?[kMGT]?$/)) exit 1
		m = 1; s = substr(q, length(q))
		if (s == "k") m = 1e3; else if (s == "M") m = 1e6; else if (s == "G") m = 1e9; else if (s == "T") m = 1e12
		if (m > 1) q = substr(q, 1, length(q) - 1)
		printf "%.0f\n", q * m
	}' || die "rate $1: want a number with an optional k/M/G/T suffix"
}

# write_conflists: one conflist per chain (qoscni, ref, base = unshaped) in $WORK.
write_conflists() {
	local bw
	for plugin in qoscni ref base; do
		case $plugin in
		qoscni) bw=',{"type":"qoscni","capabilities":{"bandwidth":true,"io.kubernetes.cri.pod-annotations":true},"stateDir":"'$WORK'/state"}' ;;
		ref) bw=',{"type":"bandwidth","capabilities":{"bandwidth":true}}' ;;
		base) bw="" ;;
		esac
		local idx br net
		case $plugin in qoscni) idx=1 br=shbq0 ;; ref) idx=2 br=shbr0 ;; base) idx=3 br=shbb0 ;; esac
		net=10.61.$idx.0/24
		cat >"$WORK/$plugin.conflist" <<-EOF
		{"cniVersion":"1.0.0","name":"shb$plugin","plugins":[
		 {"type":"bridge","bridge":"$br","isGateway":true,
		  "ipam":{"type":"host-local","ranges":[[{"subnet":"$net"}]],"dataDir":"$WORK/ipam-$plugin"}}$bw]}
		EOF
	done
}

cni_path() { if [ "$1" = qoscni ]; then echo "$QOSCNI_ROOT/bin:$REF_CNI_DIR"; else echo "$REF_CNI_DIR"; fi; }

# cap_args RATE_BITS LABEL: what containerd passes for a pod annotated with
# LABEL both ways (libcni hands each plugin only the capabilities it declares).
cap_args() {
	printf '{"bandwidth":{"IngressRate":%s,"IngressBurst":%s,"EgressRate":%s,"EgressBurst":%s},' "$1" "$RUNTIME_BURST" "$1" "$RUNTIME_BURST"
	printf '"io.kubernetes.cri.pod-annotations":{"kubernetes.io/ingress-bandwidth":"%s","kubernetes.io/egress-bandwidth":"%s"}}\n' "$2" "$2"
}

declare -A POD_IP CAPS
# pod_add PLUGIN POD ID CAPARGS: ADD; sets POD_IP[POD]; logs the shaping qdiscs.
pod_add() {
	local plugin=$1 pod=$2 id=$3 caps=$4 out devs d
	out=$(cnitool "$NODE" add --conflist "$WORK/$plugin.conflist" --cni-path "$(cni_path "$plugin")" \
		--cache-dir "$WORK/cache" --netns "/run/netns/$pod" --id "$id" --cap-args "$caps") ||
		die "$plugin ADD $id failed"
	POD_IP[$pod]=$(jq -r '.ips[0].address' <<<"$out" | cut -d/ -f1)
	CAPS[$pod]=$caps
	ip netns exec "$NODE" ping -n -q -c 1 -W 2 "${POD_IP[$pod]}" >/dev/null || die "$plugin pod ${POD_IP[$pod]} unreachable"
	# Host-side devices: the veth and, when shaped, the IFB.
	devs=$(jq -r '.interfaces[] | select(.sandbox == null or .sandbox == "") | .name' <<<"$out")
	for d in $devs; do
		ip netns exec "$NODE" tc qdisc show dev "$d" 2>/dev/null | grep -E '^qdisc (tbf|htb|bfifo|pfifo)' |
			sed "s/^/    $plugin $d: /" || true
	done
}

pod_del() {
	local plugin=$1 pod=$2 id=$3
	cnitool "$NODE" del --conflist "$WORK/$plugin.conflist" --cni-path "$(cni_path "$plugin")" \
		--cache-dir "$WORK/cache" --netns "/run/netns/$pod" --id "$id" --cap-args "${CAPS[$pod]}" ||
		warn "$plugin DEL $id failed"
}

declare -A SERVER_PID
start_server() {
	ip netns exec "$1" iperf3 -s -J >/dev/null 2>&1 &
	SERVER_PID[$1]=$!
	BG_PIDS+=($!)
}
restart_server() {
	kill "${SERVER_PID[$1]}" 2>/dev/null || true
	wait "${SERVER_PID[$1]}" 2>/dev/null || true
	start_server "$1"
	sleep 0.5
}

# wait_idle: until no qdisc in the node netns holds a backlog, so that one
# run's queue (the reference's can hold seconds at low rates) never spills
# into the next.
wait_idle() {
	local i q
	for ((i = 0; i < 900; i++)); do
		q=$(ip netns exec "$NODE" tc -s qdisc show) || q=""
		[[ $q =~ backlog\ [1-9] ]] || { sleep 0.3; return 0; }
		sleep 0.2
	done
	warn "queues still not empty after 180 s"
}

# waitable CMD...: run CMD in the background and wait for it. bash defers a
# trap while a foreground child runs, and drops a SIGINT whose foreground
# child exits normally (iperf3 and ping catch it), so Ctrl-C would not stop
# the script; a trapped signal interrupts `wait` at once.
waitable() {
	"$@" &
	local pid=$!
	BG_PIDS+=("$pid")
	wait "$pid"
}

dir_flag() { if [ "$1" = egress ]; then echo -R; fi; }

# steady POD DIR FILE: one iperf3 run; sets OUT to "GOODPUT<TAB>FIRST"
# (bit/s) or "fail<TAB>fail". Not run in a subshell: it may restart the
# server, whose PID the cleanup must know.
steady() {
	local pod=$1 dir=$2 f=$3
	wait_idle
	if waitable timeout --foreground $((DURATION + OMIT + 150)) ip netns exec "$NODE" iperf3 -c "${POD_IP[$pod]}" -t "$DURATION" -O "$OMIT" \
		-i 1 -J --get-server-output $(dir_flag "$dir") >"$f" 2>&1 && OUT=$("$WORK/shaping" iperf "$f" 2>"$f.err"); then
		return 0
	fi
	warn "iperf3 run $f failed: $(head -c 300 "$f.err" 2>/dev/null) $(jq -r '.error // empty' "$f" 2>/dev/null)"
	restart_server "$pod"
	OUT=$'fail\tfail'
}

# rtt POD DIR PREFIX: ping while a bulk flow saturates DIR; sets OUT to
# "SENT<TAB>RECEIVED<TAB>P50<TAB>P99" (ms).
rtt() {
	local pod=$1 dir=$2 f=$3 probe_s bulk
	probe_s=$(awk -v n="$PROBES" 'BEGIN { printf "%d\n", n * 0.05 + 0.999 }')
	wait_idle
	timeout --foreground $((probe_s + 160)) ip netns exec "$NODE" iperf3 -c "${POD_IP[$pod]}" -t $((2 + probe_s + 3)) \
		-J $(dir_flag "$dir") >"$f.bulk.json" 2>&1 &
	bulk=$!
	BG_PIDS+=($bulk)
	sleep 2 # past slow start: the queue is full when probing starts
	waitable ip netns exec "$NODE" ping -n -i 0.05 -c "$PROBES" -w $((probe_s + 3)) "${POD_IP[$pod]}" >"$f.ping" 2>&1 || true
	wait "$bulk" || { warn "bulk flow of $f failed"; restart_server "$pod"; }
	OUT=$("$WORK/shaping" ping "$f.ping") || OUT=$'0\t0\t-\t-'
}

pod_of() { if [ "$1" = ref ]; then echo "$POD_R"; else echo "$POD_Q"; fi; }

RESULTS=$WORK/results.tsv
: >"$RESULTS"
result() { printf '%s\n' "$*" | tr ' ' '\t' >>"$RESULTS"; }

write_conflists
for ns in "$NODE" "$POD_Q" "$POD_R" "$POD_B"; do netns_fresh "$ns"; done
for ns in "$POD_Q" "$POD_R" "$POD_B"; do start_server "$ns"; done
sleep 0.5

result meta "Shaping benchmark: $RUNS steady run(s) of ${DURATION}s after ${OMIT}s omitted per cell (median)," \
	"$PROBES RTT probes every 50 ms, one TCP flow; bridge + host-local pods, cniVersion 1.0.0;" \
	"$(nproc) CPUs, kernel $(uname -r), iperf3 $(iperf3 --version | awk 'NR==1 {print $2}')," \
	"$(date -u +%Y-%m-%d), load average at start $(cut -d' ' -f1-3 /proc/loadavg)."

log "unshaped baseline"
pod_add base "$POD_B" "base-$$" ""
for dir in ingress egress; do
	steady "$POD_B" "$dir" "$RAW/baseline-$dir.json"
	g=${OUT%%$'\t'*}
	info "$dir: $(awk -v g="$g" 'BEGIN { printf "%.2f Gbit/s", g / 1e9 }')"
	[ "$g" = fail ] || result baseline "$dir" "$g"
done
pod_del base "$POD_B" "base-$$"

run=0
for label in $RATES; do
	bits=$(rate_bits "$label")
	caps=$(cap_args "$bits" "$label")
	for dir in $DIRS; do
		log "$label $dir"
		id=$label-$dir-$$
		for plugin in $PLUGINS; do
			pod=$(pod_of "$plugin")
			pod_add "$plugin" "$pod" "$plugin-$id" "$caps"
		done
		for ((r = 1; r <= RUNS; r++)); do
			order=$PLUGINS
			# Alternate who goes first so drift on the shared machine hits both.
			((++run % 2 == 0)) && order=$(tr ' ' '\n' <<<"$PLUGINS" | tac | tr '\n' ' ')
			for plugin in $order; do
				steady "$(pod_of "$plugin")" "$dir" "$RAW/$label-$dir-$plugin-$r.json"
				v=$OUT
				result steady "$bits" "$label" "$dir" "$plugin" "$r" "$v"
				info "$plugin run $r: $(awk -v g="${v%%$'\t'*}" -v f="${v##*$'\t'}" -v b="$bits" \
					'BEGIN { if (g == "fail") print "failed"; else printf "goodput/rate %.3f, first second/rate %.3f", g / b, f / b }')"
			done
		done
		for plugin in $PLUGINS; do
			rtt "$(pod_of "$plugin")" "$dir" "$RAW/$label-$dir-$plugin-rtt"
			v=$OUT
			result rtt "$bits" "$label" "$dir" "$plugin" "$v"
			info "$plugin RTT under load: sent/received/p50/p99 ms: $(tr '\t' ' ' <<<"$v")"
		done
		for plugin in $PLUGINS; do
			pod_del "$plugin" "$(pod_of "$plugin")" "$plugin-$id"
		done
	done
done

echo
"$WORK/shaping" table "$RESULTS"
[ -z "${RAW_DIR:-}" ] || { cp "$RESULTS" "$RAW_DIR/results.tsv"; info "raw output kept in $RAW_DIR"; }
