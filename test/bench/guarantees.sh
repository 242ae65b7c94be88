#!/usr/bin/env bash
# Guaranteed bandwidth (issue 17): qoscni's node hierarchy against the
# reference bandwidth plugin, same node, same uplink, one run. Prints
# markdown tables for docs/benchmarks.md.
#
# Topology, fresh per uplink rate: a node netns and a "network" netns behind
# an emulated uplink, a veth with a TBF at the uplink rate on both ends (so
# the uplink is the bottleneck the way a NIC is; UPLINK_QUEUE_MS of queue,
# a bucket of 1 ms of the rate, at least 64 KiB). The iperf3 servers sit in
# the network netns; the clients in the pods, one flow per pod:
#   egress  = out of the pods (the pod's client sends),
#   ingress = into the pods (iperf3 -R: the server in the network sends).
# Three pods per setup, all saturating one direction at once:
#   qoscni    standalone, "nodeCapacity" = the uplink rate, A requests 60 %
#             of it, B 20 % (qoscni.io/*-bandwidth-request), C nothing;
#   ref-none  reference bridge + host-local + bandwidth, no caps (the
#             reference can only cap);
#   ref-caps  the same with caps A 60 %, B 20 %, C 20 % (bursts of 10 ms of
#             the rate, at least 64 KiB: containerd's 4294967295-bit burst
#             would leave the caps unenforced for minutes).
# Measured per (rate, direction):
#   steady    goodput of each pod over DURATION s after OMIT s (receiving
#             side), median of RUNS; A and B over their requests, C and the
#             total over the capacity;
#   wc        work conservation: A runs WC_ON s, is idle WC_OFF s, runs
#             WC_BACK s, while B and C saturate; per-pod counters every
#             100 ms (test/bench/guarantees sample) give the time from A
#             idle to B+C >= 0.93 of the capacity and from A's return to A
#             >= 0.95 of its request (each held 0.3 s), and A's mean share
#             of its request from 1 s after its return; medians of RUNS;
#   rtt       ping -i 0.05 (PROBES) from A's pod to the network netns while
#             all three saturate: qoscni with A normal, then A re-added with
#             qoscni.io/bandwidth-priority: high, and both references.
#   scale     (SCALE=1, at the last rate of RATES) one flow out of pod C with
#             SCALE_FEW vs SCALE_MANY qoscni pods in the hierarchy (the
#             others with small requests), and qoscni-cnitool bench ADD p50
#             at SCALE_MANY pods with a request vs without nodeCapacity
#             (medians of SCALE_PAIRS runs of each, alternating the order),
#             and the node agent's reconcile pass over those pods (p50, p99
#             of the passes of AGENT_SECS at AGENT_INTERVAL).
#
# Environment:
#   RATES="100M 1G"   uplink rates = node capacity (Kubernetes quantities)
#   RUNS=3            runs per steady / wc cell (median)
#   DURATION=6 OMIT=2 iperf3 -t and -O of a steady run
#   WC_ON=4 WC_OFF=3 WC_BACK=3  phases of a work-conservation run, seconds
#   PROBES=200        ping probes (every 50 ms)
#   DIRS="egress ingress"   UPLINK_QUEUE_MS=20
#   CAPACITY_PCT=100  nodeCapacity as a percentage of the uplink rate (the
#                     requests and the reference caps are shares of it; rows
#                     are labelled "RATE,cap=PCT%" when it is not 100)
#   SCALE=1 SCALE_FEW=10 SCALE_MANY=500 SCALE_CYCLES=30 SCALE_PAIRS=3
#   SCALE_SETTLE=15s  pause after filling SCALE_MANY pods before the timed
#                     ADDs (the kernel's IPv6 work for 500 new interfaces
#                     holds the RTNL lock for seconds and every ADD waits)
#   AGENT_SECS=30 AGENT_INTERVAL=1s
#   QUICK=1           RATES=100M RUNS=1 DURATION=4 PROBES=60 SCALE=0 unless set
#   RAW_DIR=DIR       keep the raw iperf3 JSON, samples and ping output there
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

if [ "${QUICK:-0}" = 1 ]; then
	: "${RATES:=100M}" "${RUNS:=1}" "${DURATION:=4}" "${PROBES:=60}" "${SCALE:=0}"
fi
RATES=${RATES:-100M 1G}
RUNS=${RUNS:-3}
DURATION=${DURATION:-6}
OMIT=${OMIT:-2}
WC_ON=${WC_ON:-4}
WC_OFF=${WC_OFF:-3}
WC_BACK=${WC_BACK:-3}
PROBES=${PROBES:-200}
DIRS=${DIRS:-egress ingress}
UPLINK_QUEUE_MS=${UPLINK_QUEUE_MS:-20}
SCALE=${SCALE:-1}
SCALE_FEW=${SCALE_FEW:-10}
SCALE_MANY=${SCALE_MANY:-500}
SCALE_CYCLES=${SCALE_CYCLES:-30}
SCALE_PAIRS=${SCALE_PAIRS:-3}
SCALE_SETTLE=${SCALE_SETTLE:-15s}
AGENT_SECS=${AGENT_SECS:-30}
AGENT_INTERVAL=${AGENT_INTERVAL:-1s}
CAPACITY_PCT=${CAPACITY_PCT:-100}
BUDGET_MS=10 # qoscni's default queue-delay budget (no maxQueueDelay in the config)

P=qgb$$ # every netns name starts with it
NODE=$P-node
NET=$P-net
NET_IP=10.63.255.2
NODE_UP_IP=10.63.255.1
PODS="a b c"
VARIANTS="qoscni ref-none ref-caps"
declare -A PORT=([a]=5301 [b]=5302 [c]=5303)

require_root
for t in iperf3 ping jq tc nft; do command -v "$t" >/dev/null || die "$t missing (make deps; apt-get install jq)"; done
for p in bridge host-local bandwidth; do
	[ -x "$REF_CNI_DIR/$p" ] || die "reference plugin $REF_CNI_DIR/$p missing (make deps)"
done

WORK=$(mktemp -d /tmp/qoscni-gbench.XXXXXX)
export QOSCNI_STATE_REGISTRY=$WORK/statedirs # throw-away stateDirs
RAW=${RAW_DIR:-$WORK/raw}
mkdir -p "$RAW"
BG_PIDS=()
# all_netns: every namespace this run made (the pods of the scale step too).
all_netns() {
	local list
	list=$(ip netns list) || list=""
	awk -v p="^$P-" '$1 ~ p { print $1 }' <<<"$list"
}
cleanup() {
	local pid ns
	for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	# The node netns holds bridges, veths, IFBs and the counting table;
	# everything else lives in the other namespaces and $WORK.
	for ns in $(all_netns); do netns_gone "$ns"; done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_bins qoscni qoscni-cnitool qoscni-agent
G=$WORK/guarantees
(cd "$QOSCNI_ROOT" && CGO_ENABLED=0 go build -trimpath -o "$G" ./test/bench/guarantees)

rate_bits() {
	awk -v q="$1" 'BEGIN {
		if (!match(q, /^[0-9]+(\.[0-9]+)?[kMGT]?$/)) exit 1
		m = 1; s = substr(q, length(q))
		if (s == "k") m = 1e3; else if (s == "M") m = 1e6; else if (s == "G") m = 1e9; else if (s == "T") m = 1e12
		if (m > 1) q = substr(q, 1, length(q) - 1)
		printf "%.0f\n", q * m
	}' || die "rate $1: want a number with an optional k/M/G/T suffix"
}
frac() { awk -v b="$1" -v f="$2" 'BEGIN { printf "%.0f\n", b * f }'; }
now() { date +%s.%N; }

RESULTS=$WORK/results.tsv
: >"$RESULTS"
result() { printf '%s\n' "$*" | tr ' ' '\t' >>"$RESULTS"; }

# setup_rate LABEL BITS: fresh node, network and pod namespaces, the uplink,
# the conflists of this rate.
setup_rate() {
	local label=$1 bits=$2 burst ns
	for ns in $(all_netns); do netns_gone "$ns"; done
	# The records of the rate before: its pods went with their namespaces,
	# and this rate reuses their names (the agent would take both for one).
	rm -rf "$WORK"/*/state
	netns_fresh "$NODE"
	netns_fresh "$NET"
	ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
	ip -n "$NODE" link add up0 type veth peer name up1 netns "$NET"
	ip -n "$NODE" addr add "$NODE_UP_IP/30" dev up0
	ip -n "$NET" addr add "$NET_IP/30" dev up1
	ip -n "$NODE" link set up0 up
	ip -n "$NET" link set up1 up
	ip -n "$NET" route add 10.63.0.0/16 via "$NODE_UP_IP"
	burst=$(awk -v b="$bits" 'BEGIN { v = b / 8 / 1000; if (v < 65536 + 1514) v = 65536 + 1514; printf "%.0f\n", v }')
	tc -n "$NODE" qdisc add dev up0 root tbf rate "$bits" burst "$burst" latency "${UPLINK_QUEUE_MS}ms"
	tc -n "$NET" qdisc add dev up1 root tbf rate "$bits" burst "$burst" latency "${UPLINK_QUEUE_MS}ms"
	for v in $VARIANTS; do
		for p in $PODS; do netns_fresh "$P-$v-$p"; done
	done
	local d=$WORK/$label
	mkdir -p "$d"
	cat >"$d/qoscni.conflist" <<-EOF
	{"cniVersion":"1.1.0","name":"qgq","plugins":[{"type":"qoscni","bridge":"qgq0",
	 "isGateway":true,"isDefaultGateway":true,"ipMasq":false,"mtu":1500,"stateDir":"$d/state",
	 "ipam":{"type":"qoscni","ranges":[[{"subnet":"10.63.4.0/22"}]],"dataDir":"$d/ipam-q"},
	 "nodeCapacity":{"ingress":"$CAP","egress":"$CAP"},
	 "capabilities":{"bandwidth":true,"io.kubernetes.cri.pod-annotations":true}}]}
	EOF
	local br net
	for v in ref-none ref-caps; do
		case $v in ref-none) br=qgr0 net=10.63.2.0/24 ;; ref-caps) br=qgs0 net=10.63.3.0/24 ;; esac
		cat >"$d/$v.conflist" <<-EOF
		{"cniVersion":"1.0.0","name":"qg$v","plugins":[
		 {"type":"bridge","bridge":"$br","isGateway":true,"isDefaultGateway":true,
		  "ipam":{"type":"host-local","ranges":[[{"subnet":"$net"}]],"dataDir":"$d/ipam-$v"}},
		 {"type":"bandwidth","capabilities":{"bandwidth":true}}]}
		EOF
	done
	for p in $PODS; do start_server "$p"; done
	sleep 0.5
}

cni_path() { if [ "$1" = qoscni ]; then echo "$QOSCNI_ROOT/bin:$REF_CNI_DIR"; else echo "$REF_CNI_DIR"; fi; }
conflist_of() { if [ "$1" = qoscni ]; then echo "$WORK/$LABEL/qoscni.conflist"; else echo "$WORK/$LABEL/$1.conflist"; fi; }

# annotations_caps JSON_OBJECT: the pod-annotations capability arg.
annotations_caps() { printf '{"io.kubernetes.cri.pod-annotations":%s}\n' "$1"; }
# request_caps BITS [PRIO]: a request both ways.
request_caps() {
	local prio=""
	[ -z "${2:-}" ] || prio=',"qoscni.io/bandwidth-priority":"'$2'"'
	annotations_caps '{"qoscni.io/ingress-bandwidth-request":"'$1'","qoscni.io/egress-bandwidth-request":"'$1'"'$prio'}'
}
# limit_caps BITS: what containerd sends for a capped pod (burst: see top).
limit_caps() {
	local burst
	burst=$(awk -v b="$1" 'BEGIN { v = b / 100; if (v < 524288) v = 524288; printf "%.0f\n", v }')
	printf '{"bandwidth":{"IngressRate":%s,"IngressBurst":%s,"EgressRate":%s,"EgressBurst":%s},' "$1" "$burst" "$1" "$burst"
	printf '"io.kubernetes.cri.pod-annotations":{"kubernetes.io/ingress-bandwidth":"%s","kubernetes.io/egress-bandwidth":"%s"}}\n' "$1" "$1"
}

declare -A POD_IP HOST_VETH CAPS
# pod_add VARIANT POD NETNS CAPARGS
pod_add() {
	local v=$1 p=$2 ns=$3 caps=$4 out br
	out=$(cnitool "$NODE" add --conflist "$(conflist_of "$v")" --cni-path "$(cni_path "$v")" \
		--cache-dir "$WORK/$LABEL/cache" --netns "/run/netns/$ns" --id "$ns" --cap-args "$caps") ||
		die "$v ADD $ns failed"
	POD_IP[$ns]=$(jq -r '.ips[0].address' <<<"$out" | cut -d/ -f1)
	br=$(jq -r '.interfaces[0].name' <<<"$out")
	HOST_VETH[$ns]=$(jq -r --arg br "$br" '[.interfaces[] | select((.sandbox == null or .sandbox == "") and .name != $br) | .name][0]' <<<"$out")
	CAPS[$ns]=$caps
}
pod_del() {
	local v=$1 ns=$2
	cnitool "$NODE" del --conflist "$(conflist_of "$v")" --cni-path "$(cni_path "$v")" \
		--cache-dir "$WORK/$LABEL/cache" --netns "/run/netns/$ns" --id "$ns" --cap-args "${CAPS[$ns]}" ||
		warn "$v DEL $ns failed"
}

declare -A SERVER_PID
start_server() {
	ip netns exec "$NET" iperf3 -s -J -p "${PORT[$1]}" >/dev/null 2>&1 &
	SERVER_PID[$1]=$!
	BG_PIDS+=($!)
}
restart_server() {
	kill "${SERVER_PID[$1]}" 2>/dev/null || true
	wait "${SERVER_PID[$1]}" 2>/dev/null || true
	start_server "$1"
	sleep 0.5
}

waitable() {
	"$@" &
	local pid=$!
	BG_PIDS+=("$pid")
	wait "$pid"
}

# wait_idle: until no qdisc of the node and network holds a backlog.
wait_idle() {
	local i q
	for ((i = 0; i < 300; i++)); do
		q=$(ip netns exec "$NODE" tc -s qdisc show; ip netns exec "$NET" tc -s qdisc show) || q=""
		[[ $q =~ backlog\ [1-9] ]] || { sleep 0.3; return 0; }
		sleep 0.2
	done
	warn "queues still not empty after 60 s"
}

# flow VARIANT POD DIR SECONDS FILE [OMIT]: start one iperf3 client in the
# background; FLOW_PID is its PID.
flow() {
	local v=$1 p=$2 dir=$3 t=$4 f=$5 omit=${6:-0} ns=$P-$1-$2 extra=--get-server-output
	[ "$dir" = ingress ] && extra=-R
	timeout --foreground $((t + 60)) ip netns exec "$ns" iperf3 -c "$NET_IP" -p "${PORT[$p]}" -t "$t" -O "$omit" \
		-i 1 -J $extra >"$f" 2>&1 &
	FLOW_PID=$!
	BG_PIDS+=($FLOW_PID)
}

# finish POD FILE PID: wait for a flow; prints its goodput or "fail"
# (and restarts the pod's server).
finish() {
	local p=$1 f=$2 pid=$3 g
	if wait "$pid" && g=$("$G" iperf "$f" 2>"$f.err"); then
		GOODPUT[$p]=$g
		return 0
	fi
	warn "iperf3 run $f failed: $(jq -r '.error // empty' "$f" 2>/dev/null) $(cat "$f.err" 2>/dev/null)"
	restart_server "$p"
	GOODPUT[$p]=fail
}
declare -A GOODPUT PIDS

steady() {
	local v=$1 dir=$2 r=$3 p f
	wait_idle
	for p in $PODS; do
		flow "$v" "$p" "$dir" "$DURATION" "$RAW/$ROW-$dir-$v-steady$r-$p.json" "$OMIT"
		PIDS[$p]=$FLOW_PID
	done
	for p in $PODS; do finish "$p" "$RAW/$ROW-$dir-$v-steady$r-$p.json" "${PIDS[$p]}"; done
	if [ "${GOODPUT[a]}" = fail ] || [ "${GOODPUT[b]}" = fail ] || [ "${GOODPUT[c]}" = fail ]; then
		result steady "$BITS" "$ROW" "$dir" "$v" "$r" fail fail fail
		return
	fi
	result steady "$BITS" "$ROW" "$dir" "$v" "$r" "${GOODPUT[a]}" "${GOODPUT[b]}" "${GOODPUT[c]}"
	info "$v run $r: $(awk -v a="${GOODPUT[a]}" -v b="${GOODPUT[b]}" -v c="${GOODPUT[c]}" -v cap="$BITS" \
		'BEGIN { printf "A/req %.3f B/req %.3f C/cap %.3f total/cap %.3f", a / (0.6 * cap), b / (0.2 * cap), c / cap, (a + b + c) / cap }')"
}

# wc VARIANT DIR RUN: the work-conservation run.
wc() {
	local v=$1 dir=$2 r=$3 base=$RAW/$ROW-$dir-$v-wc$r p src sampler t0 t_back long out
	wait_idle
	if [ "$dir" = ingress ]; then
		src="--dev ${HOST_VETH[$P-$v-a]},${HOST_VETH[$P-$v-b]},${HOST_VETH[$P-$v-c]}"
	else
		src="--saddr ${POD_IP[$P-$v-a]},${POD_IP[$P-$v-b]},${POD_IP[$P-$v-c]}"
	fi
	# shellcheck disable=SC2086 # src is two words on purpose
	ip netns exec "$NODE" "$G" sample --out "$base.samples" --duration 120s $src &
	sampler=$!
	BG_PIDS+=($sampler)
	sleep 0.3
	long=$((WC_ON + WC_OFF + WC_BACK + 1))
	t0=$(now)
	for p in b c; do
		flow "$v" "$p" "$dir" "$long" "$base-$p.json"
		PIDS[$p]=$FLOW_PID
	done
	flow "$v" a "$dir" "$WC_ON" "$base-a1.json"
	finish a "$base-a1.json" "$FLOW_PID"
	sleep "$(awk -v t0="$t0" -v on="$WC_ON" -v off="$WC_OFF" -v n="$(now)" 'BEGIN { s = t0 + on + off - n; printf "%.3f\n", (s > 0 ? s : 0) }')"
	t_back=$(now)
	flow "$v" a "$dir" "$WC_BACK" "$base-a2.json"
	finish a "$base-a2.json" "$FLOW_PID"
	for p in b c; do finish "$p" "$base-$p.json" "${PIDS[$p]}"; done
	kill -TERM "$sampler" 2>/dev/null || true
	wait "$sampler" || warn "sampler of $base exited with an error"
	out=$("$G" recover "$base.samples" --idle-after "$(awk -v t="$t0" -v on="$WC_ON" 'BEGIN { printf "%.3f", t + on - 0.3 }')" \
		--return-at "$t_back" --capacity "$BITS" --request "$(frac "$BITS" 0.6)") || out=$'never\tnever\t-'
	result wc "$BITS" "$ROW" "$dir" "$v" "$r" "$out"
	info "$v wc run $r: idle (s), back (s), A/request held: $(tr '\t' ' ' <<<"$out")"
}

# rtt NAME VARIANT DIR: ping from A while all three saturate DIR.
rtt() {
	local name=$1 v=$2 dir=$3 base=$RAW/$ROW-$dir-$1-rtt probe_s p out
	probe_s=$(awk -v n="$PROBES" 'BEGIN { printf "%d\n", n * 0.05 + 0.999 }')
	wait_idle
	for p in $PODS; do
		flow "$v" "$p" "$dir" $((2 + probe_s + 3)) "$base-$p.json"
		PIDS[$p]=$FLOW_PID
	done
	sleep 2
	waitable ip netns exec "$P-$v-a" ping -n -i 0.05 -c "$PROBES" -w $((probe_s + 3)) "$NET_IP" >"$base.ping" 2>&1 || true
	# Where the queues were (for the analysis): still under load here.
	{ ip netns exec "$NODE" tc -s qdisc show; ip netns exec "$NODE" tc -s class show dev qoscni.out 2>/dev/null || true
	  ip netns exec "$NODE" tc -s class show dev qoscni.in 2>/dev/null || true; ip netns exec "$NET" tc -s qdisc show; } >"$base.tc" 2>&1 || true
	for p in $PODS; do finish "$p" "$base-$p.json" "${PIDS[$p]}"; done
	out=$("$G" ping "$base.ping") || out=$'0\t0\t-\t-'
	result rtt "$BITS" "$ROW" "$dir" "$name" "$out"
	info "$name RTT sent/received/p50/p99 ms: $(tr '\t' ' ' <<<"$out")"
}

# agent_passes: the node agent over the qoscni pods in place (AGENT_SECS at
# --reconcile-interval AGENT_INTERVAL): each pass reads every record, the
# whole hierarchy (classes and entries of both IFBs) and diffs every member;
# the p50 and p99 of the "took" of its debug log's "reconcile pass" lines.
agent_passes() {
	local log=$RAW/$ROW-agent.log d=$WORK/$LABEL pid took
	mkdir -p "$d/agent-net.d" "$d/agent-journal"
	"$QOSCNI_ROOT/bin/qoscni-agent" --listen "127.0.0.1:$((20000 + RANDOM % 20000))" --netns "/run/netns/$NODE" \
		--state-dir "$d/state" --state-registry "$QOSCNI_STATE_REGISTRY" --journal-dir "$d/agent-journal" \
		--cni-conf-dir "$d/agent-net.d" --reconcile-interval "$AGENT_INTERVAL" --log-level debug 2>"$log" &
	pid=$!
	BG_PIDS+=("$pid")
	sleep "$AGENT_SECS"
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	# slog's JSON handler writes a duration in nanoseconds.
	took=$(jq -r 'select(.msg == "reconcile pass") | "\(.took) \(.records) \(.repaired) \(.errors)"' "$log" 2>/dev/null | sort -g) ||
		die "agent log $log unreadable"
	[ -n "$took" ] || die "the agent logged no reconcile pass in ${AGENT_SECS}s (see $log)"
	info "agent passes (ns records repaired errors): $(tr '\n' ';' <<<"$took")"
	result scale agent_passes "$(awk 'END { print NR }' <<<"$took")"
	result scale agent_records "$(awk 'NR == 1 { print $2 }' <<<"$took")"
	result scale agent_repaired "$(awk '{ s += $3 } END { print s + 0 }' <<<"$took")"
	result scale agent_p50_ms "$(awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] / 1e6 }' <<<"$took")"
	result scale agent_p99_ms "$(awk '{ v[NR] = $1 } END { i = int(NR * 0.99 + 0.999); if (i < 1) i = 1; print v[i] / 1e6 }' <<<"$took")"
}

# scale: at the current rate, with the qoscni pods of this rate in place.
scale() {
	local few_n=$SCALE_FEW many_n=$SCALE_MANY req i ns r g dir=egress d=$WORK/$LABEL
	req=$(awk -v b="$BITS" -v n="$many_n" 'BEGIN { printf "%.0f\n", b * 0.19 / n }')
	log "$LABEL scale: filler pods request $req bit/s each"
	scale_flow() {
		local vals=() i
		for ((i = 1; i <= RUNS; i++)); do
			wait_idle
			flow qoscni c "$dir" "$DURATION" "$RAW/$ROW-scale-$1-$i.json" "$OMIT"
			finish c "$RAW/$ROW-scale-$1-$i.json" "$FLOW_PID"
			[ "${GOODPUT[c]}" = fail ] || vals+=("${GOODPUT[c]}")
		done
		printf '%s\n' "${vals[@]}" | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
	}
	# fill_to N: filler pods until N qoscni pods (A, B, C and fillers).
	fill_to() {
		for ((; PODS_IN < $1; PODS_IN++)); do
			ns=$P-fill-$PODS_IN
			netns_fresh "$ns"
			pod_add qoscni "$PODS_IN" "$ns" "$(request_caps "$req")"
		done
	}
	PODS_IN=3
	fill_to "$few_n"
	g=$(scale_flow few)
	info "one flow out of C with $few_n pods: $g bit/s"
	result scale flow_few "$g"
	result scale pods_few "$few_n"
	fill_to "$many_n"
	g=$(scale_flow many)
	info "one flow out of C with $many_n pods: $g bit/s"
	result scale flow_many "$g"
	result scale pods_many "$many_n"
	result scale label "$ROW"
	agent_passes


	# ADD latency at many_n pods: with a request vs without a node capacity,
	# SCALE_PAIRS runs of each, alternating which goes first; the medians
	# of their p50s (single runs ranged 1.2x to 1.7x on a shared machine).
	local bn=$P-bench plain=$d/plain.conflist pair kind first
	local -A p50s=()
	sed -e 's/"nodeCapacity":{[^}]*},//' "$d/qoscni.conflist" >"$plain"
	for ((pair = 1; pair <= SCALE_PAIRS; pair++)); do
		first="plain request"
		((pair % 2)) || first="request plain"
		for kind in $first; do
			local conf=$d/qoscni.conflist caps=""
			if [ "$kind" = plain ]; then conf=$plain; else caps=$(request_caps "$req"); fi
			netns_fresh "$bn"
			rm -rf "$d/bench-$kind"
			mkdir -p "$d/bench-$kind"
			sed -e "s#\"stateDir\":\"[^\"]*\"#\"stateDir\":\"$d/bench-$kind/state\"#" \
				-e "s#\"dataDir\":\"[^\"]*\"#\"dataDir\":\"$d/bench-$kind/ipam\"#" "$conf" >"$d/bench-$kind.conflist"
			r=$(cnitool "$bn" bench --conflist "$d/bench-$kind.conflist" --cni-path "$QOSCNI_ROOT/bin:$REF_CNI_DIR" \
				--cache-dir "$d/bench-$kind/cache" --population "$many_n" --cycles "$SCALE_CYCLES" --parallel 4 --settle "$SCALE_SETTLE" \
				--prefix "$P-b$kind" --label "$kind" --format tsv --quiet ${caps:+--cap-args "$caps"}) || die "cnitool bench $kind failed"
			info "bench $kind (pair $pair): $r"
			p50s[$kind]+="$(awk -F'\t' 'NR == 1 { v = $4 } END { print v }' <<<"$r") "
			netns_gone "$bn"
			sleep 2
		done
	done
	for kind in plain request; do
		result scale "add_${kind}_p50" "$(tr ' ' '\n' <<<"${p50s[$kind]}" | grep . | sort -g |
			awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
	done
	result scale add_pairs "$SCALE_PAIRS"
}

result meta "Guarantees benchmark: uplink TBF ${UPLINK_QUEUE_MS} ms queue both ways; steady $RUNS run(s) of ${DURATION}s after ${OMIT}s;" \
	"work conservation $RUNS run(s) of ${WC_ON}s on / ${WC_OFF}s idle / ${WC_BACK}s back; $PROBES probes every 50 ms; one TCP flow per pod;" \
	"$(nproc) CPUs, kernel $(uname -r), iperf3 $(iperf3 --version | awk 'NR==1 {print $2}')," \
	"$(date -u +%Y-%m-%d), load average at start $(cut -d' ' -f1-3 /proc/loadavg)."
result param budget_ms "$BUDGET_MS"

last_rate=${RATES##* }
for LABEL in $RATES; do
	UPLINK=$(rate_bits "$LABEL")
	# BITS is the node capacity: what the requests, caps and ratios refer to.
	BITS=$(frac "$UPLINK" "$(awk -v p="$CAPACITY_PCT" 'BEGIN { print p / 100 }')")
	CAP=$BITS
	log "uplink $LABEL, node capacity $CAP bit/s"
	setup_rate "$LABEL" "$UPLINK"
	ROW=$LABEL # the rows' label
	[ "$CAPACITY_PCT" = 100 ] || ROW="$LABEL,cap=$CAPACITY_PCT%"
	pod_add qoscni a "$P-qoscni-a" "$(request_caps "$(frac "$BITS" 0.6)")"
	pod_add qoscni b "$P-qoscni-b" "$(request_caps "$(frac "$BITS" 0.2)")"
	pod_add qoscni c "$P-qoscni-c" "$(annotations_caps '{}')"
	for p in $PODS; do pod_add ref-none "$p" "$P-ref-none-$p" ""; done
	pod_add ref-caps a "$P-ref-caps-a" "$(limit_caps "$(frac "$BITS" 0.6)")"
	pod_add ref-caps b "$P-ref-caps-b" "$(limit_caps "$(frac "$BITS" 0.2)")"
	pod_add ref-caps c "$P-ref-caps-c" "$(limit_caps "$(frac "$BITS" 0.2)")"
	for v in $VARIANTS; do
		for p in $PODS; do
			ip netns exec "$P-$v-$p" ping -n -q -c 1 -W 2 "$NET_IP" >/dev/null || die "$v pod $p cannot reach the network"
		done
	done
	run=0
	for dir in $DIRS; do
		log "$LABEL $dir: steady state"
		for ((r = 1; r <= RUNS; r++)); do
			order=$VARIANTS
			((++run % 2 == 0)) && order=$(tr ' ' '\n' <<<"$VARIANTS" | tac | tr '\n' ' ')
			for v in $order; do steady "$v" "$dir" "$r"; done
		done
		log "$LABEL $dir: work conservation"
		for ((r = 1; r <= RUNS; r++)); do
			for v in $VARIANTS; do wc "$v" "$dir" "$r"; done
		done
		log "$LABEL $dir: RTT from A"
		rtt qoscni-normal qoscni "$dir"
		rtt ref-none ref-none "$dir"
		rtt ref-caps ref-caps "$dir"
	done
	log "$LABEL: A re-added with priority high"
	pod_del qoscni "$P-qoscni-a"
	pod_add qoscni a "$P-qoscni-a" "$(request_caps "$(frac "$BITS" 0.6)" high)"
	for dir in $DIRS; do rtt qoscni-high qoscni "$dir"; done
	if [ "$SCALE" = 1 ] && [ "$LABEL" = "$last_rate" ]; then scale; fi
done

echo
"$G" table "$RESULTS"
[ -z "${RAW_DIR:-}" ] || { cp "$RESULTS" "$RAW_DIR/results.tsv"; info "raw output kept in $RAW_DIR"; }
