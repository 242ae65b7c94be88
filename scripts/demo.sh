#!/usr/bin/env bash
# End-to-end demo of qoscni in throw-away network namespaces:
#   a "node" netns (where the plugin runs, as under a runtime) and two pods.
# Steps: build, namespaces, ADD x2 (pod 1 with bandwidth annotations, as
# containerd passes them), pod<->pod and pod->gateway ping (v4+v6), the tc
# pipeline and measured rates of the shaped pod, the agent's metrics, a
# hostPort, pod 2's connection bound and DSCP (Calico's annotations), CHECK,
# DEL x2, prove nothing is left. Prints PASS/FAIL per step and overall.
#
# Nothing outside the namespaces and a temp dir is touched; everything is
# removed on exit, also on failure or Ctrl-C.
#
# DEMO_PLUGIN=ref runs the same flow against the reference bridge+host-local+
# portmap chain from /usr/lib/cni, to tell a demo problem from a plugin one.
#
# To add a step (shaping, hostPorts, metrics...): write a step_xxx function
# that returns non-zero on failure and add one `step` line in main.
set -uo pipefail

. "$(dirname "$0")/lib.sh"

DEMO_PLUGIN=${DEMO_PLUGIN:-qoscni}
NODE=qoscni-demo-node
PODS=(qoscni-demo-pod1 qoscni-demo-pod2)
IFNAME=eth0

WORK=""
RESULTS=()
FAILED=0
declare -A POD_ID=() POD_ADDED=() POD_V4=() POD_V6=() POD_CAPS=()
WEB_PID=""
AGENT_PID=""
AGENT_ADDR=127.0.0.1:19742
# What containerd passes for a pod annotated with
# kubernetes.io/ingress-bandwidth: 10M and kubernetes.io/egress-bandwidth: 5M.
# Pod 2 publishes container port 80 as hostPort 8080 (containerd's key case)
# and carries Calico's annotations for a bound of 2 connections into it and
# the DSCP EF on what it sends.
PORT_CAPS='{"portMappings":[{"HostPort":8080,"ContainerPort":80,"Protocol":"TCP"}]}'
CONTROL_CAPS='{"portMappings":[{"HostPort":8080,"ContainerPort":80,"Protocol":"TCP"}],"io.kubernetes.cri.pod-annotations":{"qos.projectcalico.org/ingressMaxConnections":"2","qos.projectcalico.org/dscp":"EF"}}'
SHAPED_CAPS='{"io.kubernetes.cri.pod-annotations":{"kubernetes.io/ingress-bandwidth":"10M","kubernetes.io/egress-bandwidth":"5M"},"bandwidth":{"IngressRate":10000000,"IngressBurst":4294967295,"EgressRate":5000000,"EgressBurst":4294967295}}'


cleanup() {
	local rc=$?
	set +e
	if [ -n "$AGENT_PID" ]; then kill "$AGENT_PID" 2>/dev/null; wait "$AGENT_PID" 2>/dev/null; fi
	if [ -n "$WORK" ] && [ -f "$WORK/conflist" ]; then
		for p in "${PODS[@]}"; do
			if [ "${POD_ADDED[$p]:-}" = 1 ]; then
				cnitool "$NODE" del "${CNI_FLAGS[@]}" --id "${POD_ID[$p]}" \
					--netns "/run/netns/$p" --ifname "$IFNAME" >/dev/null 2>&1
			fi
		done
	fi
	for p in "${PODS[@]}"; do netns_gone "$p"; done
	netns_gone "$NODE"
	[ -n "$WORK" ] && rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# step "description" function [args...]: run, record and print the outcome.
step() {
	local desc=$1
	shift
	log "$desc"
	if "$@"; then
		RESULTS+=("PASS  $desc")
	else
		RESULTS+=("FAIL  $desc")
		FAILED=1
		warn "step failed: $desc"
	fi
}

step_build() {
	if [ "$DEMO_PLUGIN" = ref ]; then
		build_bins qoscni-cnitool
	else
		build_bins qoscni qoscni-cnitool qoscni-agent
	fi
}

write_conflist() {
	STATE_DIR=$WORK/state
	IPAM_DIR=$WORK/ipam
	CACHE_DIR=$WORK/cache
	mkdir -p "$STATE_DIR" "$IPAM_DIR" "$CACHE_DIR"
	if [ "$DEMO_PLUGIN" = ref ]; then
		BRIDGE=refbr0
		CNI_PATH_ARG=$REF_CNI_DIR
		# bandwidth is left out: v1.1.1 of the reference plugin panics on CHECK.
		cat >"$WORK/conflist" <<-EOF
		{"cniVersion":"1.0.0","name":"refnet","plugins":[
		 {"type":"bridge","bridge":"$BRIDGE","isGateway":true,"isDefaultGateway":true,"ipMasq":true,"hairpinMode":true,
		  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.23.0.0/16"}],[{"subnet":"fd00:23::/64"}]],"dataDir":"$IPAM_DIR"}},
		 {"type":"portmap","capabilities":{"portMappings":true}}]}
		EOF
	else
		BRIDGE=qoscni0
		CNI_PATH_ARG=$QOSCNI_ROOT/bin:$REF_CNI_DIR
		cat >"$WORK/conflist" <<-EOF
		{"cniVersion":"1.1.0","name":"qoscni","plugins":[{"type":"qoscni","bridge":"$BRIDGE",
		 "isGateway":true,"isDefaultGateway":true,"ipMasq":true,"mtu":1500,"hairpinMode":true,
		 "stateDir":"$STATE_DIR",
		 "ipam":{"type":"qoscni","ranges":[[{"subnet":"10.22.0.0/16"}],[{"subnet":"fd00:22::/64"}]],"dataDir":"$IPAM_DIR"},
		 "capabilities":{"portMappings":true,"bandwidth":true,"io.kubernetes.cri.pod-annotations":true}}]}
		EOF
	fi
	mkdir -p "$WORK/netd"
	cp "$WORK/conflist" "$WORK/netd/10-demo.conflist"
	CNI_FLAGS=(--conflist "$WORK/conflist" --cni-path "$CNI_PATH_ARG" --cache-dir "$CACHE_DIR")
	info "conflist: $WORK/conflist"
	sed 's/^/      /' "$WORK/conflist"
}

step_namespaces() {
	netns_fresh "$NODE" || return 1
	local p
	for p in "${PODS[@]}"; do netns_fresh "$p" || return 1; done
	info "node netns $NODE, pods ${PODS[*]}"
}

step_status() {
	cnitool "$NODE" status "${CNI_FLAGS[@]}"
}

step_add() {
	local p=$1 i=$2
	POD_ID[$p]=$(printf 'demo%060d' "$i")
	POD_ADDED[$p]=1 # a failed ADD can leave state; cleanup DELs it anyway
	local caps=()
	[ -n "${POD_CAPS[$p]:-}" ] && caps=(--cap-args "${POD_CAPS[$p]}")
	cnitool "$NODE" add "${CNI_FLAGS[@]}" "${caps[@]}" --id "${POD_ID[$p]}" --netns "/run/netns/$p" \
		--ifname "$IFNAME" --args "K8S_POD_NAMESPACE=default;K8S_POD_NAME=demo-$i;K8S_POD_UID=00000000-0000-0000-0000-00000000000$i" \
		>"$WORK/result-$p.json" || return 1
	sed 's/^/      /' "$WORK/result-$p.json"
	# Read the addresses back from the kernel, not from the result.
	POD_V4[$p]=$(ip -n "$p" -4 -o addr show dev "$IFNAME" scope global | first_addr)
	POD_V6[$p]=$(ip -n "$p" -6 -o addr show dev "$IFNAME" scope global | first_addr)
	info "$p: $IFNAME v4=${POD_V4[$p]:-none} v6=${POD_V6[$p]:-none}"
	[ -n "${POD_V4[$p]}" ] && [ -n "${POD_V6[$p]}" ]
}

# ping_from NETNS FAMILY DEST: a few tries, as IPv6 DAD may still be running.
ping_from() {
	local ns=$1 fam=$2 dst=$3 try
	[ -n "$dst" ] || { warn "no $fam destination"; return 1; }
	for try in 1 2 3 4 5; do
		if ip netns exec "$ns" ping "-$fam" -c 1 -W 1 "$dst" >/dev/null 2>&1; then
			info "$ns -> $dst (IPv$fam) ok"
			return 0
		fi
		sleep 1
	done
	warn "$ns -> $dst (IPv$fam) no reply"
	return 1
}

step_ping_pods() {
	local a=${PODS[0]} b=${PODS[1]} rc=0
	ping_from "$a" 4 "${POD_V4[$b]:-}" || rc=1
	ping_from "$b" 4 "${POD_V4[$a]:-}" || rc=1
	ping_from "$a" 6 "${POD_V6[$b]:-}" || rc=1
	ping_from "$b" 6 "${POD_V6[$a]:-}" || rc=1
	return $rc
}

step_ping_gateway() {
	local p rc=0 gw4 gw6
	for p in "${PODS[@]}"; do
		gw4=$(ip -n "$p" -4 route show default | awk '/via/ && !done {print $3; done = 1}')
		gw6=$(ip -n "$p" -6 route show default | awk '/via/ && !done {print $3; done = 1}')
		info "$p default routes: v4 via ${gw4:-none}, v6 via ${gw6:-none}"
		ping_from "$p" 4 "$gw4" || rc=1
		ping_from "$p" 6 "$gw6" || rc=1
	done
	# The gateway addresses must be on the bridge in the node netns.
	ip -n "$NODE" -br addr show dev "$BRIDGE" | sed 's/^/      /'
	return $rc
}

# hostveth POD: the host end of the pod's veth, from the kernel.
hostveth() {
	local idx
	idx=$(ip -n "$1" -o link show dev "$IFNAME" | sed -n 's/.*@if\([0-9]*\).*/\1/p')
	ip -n "$NODE" -o link show | awk -F': ' -v i="$idx" '$1 == i {print $2}' | cut -d@ -f1
}

step_shaping_pipeline() {
	local p=${PODS[0]} veth ifb
	veth=$(hostveth "$p")
	[ -n "$veth" ] || { warn "no host veth for $p"; return 1; }
	ifb=$(ip -n "$NODE" -o link show type ifb | awk -F': ' 'NR == 1 {print $2}')
	info "$p: host veth $veth (traffic into the pod), IFB ${ifb:-none} (traffic out of the pod)"
	local vq iq
	# Captured, not piped into grep -q: tc writes once per qdisc, and a
	# grep that exits at the first match kills it with SIGPIPE, which
	# pipefail turns into a failure (see DESIGN.md, testing rules).
	vq=$(ip netns exec "$NODE" tc qdisc show dev "$veth") || return 1
	sed 's/^/      /' <<<"$vq"
	ip netns exec "$NODE" tc filter show dev "$veth" ingress | grep -E "u32|mirred|Redirect" | sed 's/^/      /'
	[ -n "$ifb" ] || return 1
	iq=$(ip netns exec "$NODE" tc qdisc show dev "$ifb") || return 1
	sed 's/^/      /' <<<"$iq"
	[[ $vq == *"rate 10Mbit"* ]] && [[ $iq == *"rate 5Mbit"* ]]
}

# rate_ok MEASURED LIMIT: goodput within 0.8-1.05 of the limit (TCP over
# Ethernet tops out near 0.956 of the frame rate).
rate_ok() {
	awk -v m="$1" -v l="$2" 'BEGIN { r = m / l; printf "      %.2f Mbit/s at a %.0f Mbit/s limit (%.2fx)\n", m/1e6, l/1e6, r; exit !(r >= 0.8 && r <= 1.05) }'
}

step_shaping_rates() {
	local p=${PODS[0]} pid rc=0 in out
	command -v iperf3 >/dev/null || { warn "iperf3 not installed: run 'make deps'"; return 1; }
	ip netns exec "$p" iperf3 -s --bind "${POD_V4[$p]}" >/dev/null 2>&1 &
	pid=$!
	sleep 0.5
	in=$(ip netns exec "$NODE" iperf3 -c "${POD_V4[$p]}" -t 4 -O 1 -J 2>/dev/null | json_field end.sum_received.bits_per_second)
	out=$(ip netns exec "$NODE" iperf3 -c "${POD_V4[$p]}" -t 4 -O 1 -R -J 2>/dev/null | json_field end.sum_received.bits_per_second)
	kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	info "into $p (node -> pod, iperf3 4 s):"
	rate_ok "${in:-0}" 10000000 || rc=1
	info "out of $p (pod -> node, iperf3 -R 4 s):"
	rate_ok "${out:-0}" 5000000 || rc=1
	return $rc
}

# web_server POD: a web server on port 80 of the pod, its pid in WEB_PID.
web_server() {
	local p=$1 dir listening tries=0
	dir=$(mktemp -d "$WORK/www.XXXX")
	echo "hello from $p" >"$dir/index.html"
	(cd "$dir" && exec ip netns exec "$p" python3 -m http.server 80 --bind :: >/dev/null 2>&1) &
	WEB_PID=$!
	until listening=$(ip netns exec "$p" ss -ltn 'sport = :80') && [[ $listening == *:80* ]]; do
		tries=$((tries + 1))
		[ $tries -lt 100 ] || { warn "web server in $p did not start"; return 1; }
		sleep 0.1
	done
}

step_hostport() {
	local p=${PODS[1]} pid rc=0 out gw
	web_server "$p"
	pid=$WEB_PID
	gw=$(ip -n "$NODE" -4 -o addr show dev "$BRIDGE" | first_addr)
	for url in "http://$gw:8080/" "http://127.0.0.1:8080/"; do
		if out=$(ip netns exec "$NODE" curl -s --max-time 3 "$url") && [ "$out" = "hello from $p" ]; then
			info "node -> $url: $out"
		else
			warn "node -> $url failed: $out"
			rc=1
		fi
	done
	kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	if [ "$DEMO_PLUGIN" != ref ]; then
		info "the mapping is one element of a map in qoscni's nftables table:"
		ip netns exec "$NODE" nft list map inet qoscni hostport4 | sed 's/^/      /'
	fi
	return $rc
}

# step_controls: pod 2's bound of 2 connections holds two open from the
# node and refuses a third with a TCP reset; its elements and the refusal
# count are shown. The pod's server answers each connection with a line and
# keeps it open for 5 s.
step_controls() {
	local p=${PODS[1]} ip=${POD_V4[${PODS[1]}]} rc=0 out body pid tries=0 listening
	ip netns exec "$p" python3 -c '
import socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 81)); s.listen(16)
def hold(c):
    c.sendall(b"hello\n"); time.sleep(5); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=hold, args=(c,), daemon=True).start()
' >/dev/null 2>&1 &
	pid=$!
	until listening=$(ip netns exec "$p" ss -ltn 'sport = :81') && [[ $listening == *:81* ]]; do
		tries=$((tries + 1))
		[ $tries -lt 100 ] || { warn "server in $p did not start"; kill "$pid"; return 1; }
		sleep 0.1
	done
	out=$(ip netns exec "$NODE" timeout 20 bash -c '
		exec 3<>"/dev/tcp/$1/81" || { echo "first connection failed"; exit 1; }
		exec 4<>"/dev/tcp/$1/81" || { echo "second connection failed"; exit 1; }
		timeout 5 bash -c ": 5<>/dev/tcp/$1/81" 2>/dev/null
		case $? in 0) third=accepted ;; 124) third=unanswered ;; *) third=refused ;; esac
		read -t 3 a <&3 && read -t 3 b <&4 || { echo "the two open connections did not answer"; exit 1; }
		echo "2 open, third $third"
	' - "$ip" 2>/dev/null)
	kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	if [ "$out" = "2 open, third refused" ]; then info "node -> $ip:81: $out"; else warn "node -> $ip:81: $out"; rc=1; fi
	info "the controls are elements keyed by the pod's address in qoscni's table:"
	ip netns exec "$NODE" nft list set inet qoscni conn-ingress4 | sed 's/^/      /'
	ip netns exec "$NODE" nft list map inet qoscni dscp4 | sed 's/^/      /'
	body=$(ip netns exec "$NODE" curl -sf "http://$AGENT_ADDR/metrics") || { warn "no metrics"; return 1; }
	echo "$body" | grep -E '^qoscni_control_' | sed 's/^/      /'
	[[ $body == *'qoscni_control_refused_connections_total{direction="ingress",interface="eth0",namespace="default",pod="demo-2"} 1'* ]] || { warn "refusal not exported"; rc=1; }
	return $rc
}

step_metrics() {
	local tries=0 body
	ip netns exec "$NODE" "$QOSCNI_ROOT/bin/qoscni-agent" --listen "$AGENT_ADDR" --state-dir "$STATE_DIR" \
		--journal-dir "$WORK/journal" --cni-conf-dir "$WORK/netd" --state-registry "$QOSCNI_STATE_REGISTRY" >"$WORK/agent.log" 2>&1 &
	AGENT_PID=$!
	until body=$(ip netns exec "$NODE" curl -sf "http://$AGENT_ADDR/metrics"); do
		tries=$((tries + 1))
		[ $tries -lt 50 ] || { warn "agent did not answer"; cat "$WORK/agent.log"; return 1; }
		sleep 0.1
	done
	info "qoscni-agent on $AGENT_ADDR (node netns); the shaped pod's series:"
	echo "$body" | grep -E '^qoscni_(shaping_(rate_limit_bytes_per_second|sent_bytes_total|dropped_packets_total|backlog_bytes)|cni_operations_total|ipam_addresses_used)' | sed 's/^/      /'
	info "status CLI:"
	ip netns exec "$NODE" "$QOSCNI_ROOT/bin/qoscni-agent" status --state-dir "$STATE_DIR" --state-registry "$QOSCNI_STATE_REGISTRY" | sed 's/^/      /'
	[[ $body == *'qoscni_shaping_rate_limit_bytes_per_second{direction="ingress",interface="eth0",namespace="default",pod="demo-1"} 1.25e+06'* ]]
}

step_check() {
	local p rc=0
	for p in "${PODS[@]}"; do
		if cnitool "$NODE" check "${CNI_FLAGS[@]}" --id "${POD_ID[$p]}" --netns "/run/netns/$p" --ifname "$IFNAME"; then
			info "$p: CHECK ok"
		else
			rc=1
		fi
	done
	return $rc
}

step_del() {
	local p rc=0
	for p in "${PODS[@]}"; do
		if cnitool "$NODE" del "${CNI_FLAGS[@]}" --id "${POD_ID[$p]}" --netns "/run/netns/$p" --ifname "$IFNAME"; then
			POD_ADDED[$p]=0
			info "$p: DEL ok"
		else
			rc=1
		fi
	done
	return $rc
}

step_nothing_left() {
	local rc=0 left p
	left=$(ip -n "$NODE" -o link show type veth)
	if [ -n "$left" ]; then warn "veths left in node netns:"; echo "$left"; rc=1; else info "no veths in $NODE"; fi
	for p in "${PODS[@]}"; do
		if ip -n "$p" link show dev "$IFNAME" >/dev/null 2>&1; then warn "$p still has $IFNAME"; rc=1; fi
	done
	left=$(leftover_reservations "$IPAM_DIR")
	if [ -n "$left" ]; then warn "IPAM reservations left:"; echo "$left"; rc=1; else info "IPAM data dir holds no reservations"; fi
	left=$(leftover_files "$STATE_DIR")
	if [ -n "$left" ]; then warn "state records left:"; echo "$left"; rc=1; else info "state dir is empty"; fi
	if [ "$DEMO_PLUGIN" != ref ]; then
		left=$(ip netns exec "$NODE" nft list table inet qoscni 2>/dev/null |
			awk '$1 == "set" || $1 == "map" { name = $2 } /elements =/ && name ~ /^(pkt-|conn-|dscp|hostport|hostip-|hairpin)/ { print name ": " $0 }')
		if [ -n "$left" ]; then warn "nftables elements left:"; echo "$left"; rc=1; else info "no hostPort or control elements in nftables"; fi
	fi
	left=$(leftover_files "$CACHE_DIR")
	if [ -n "$left" ]; then warn "libcni cache entries left:"; echo "$left"; rc=1; else info "libcni cache is empty"; fi
	return $rc
}

main() {
	require_root
	command -v ping >/dev/null || die "ping not found: run 'make deps'"
	WORK=$(mktemp -d /tmp/qoscni-demo.XXXXXX)
	# The plugin registers each stateDir for the agent; these are throw-away.
	export QOSCNI_STATE_REGISTRY=$WORK/statedirs
	log "qoscni demo (plugin: $DEMO_PLUGIN, work dir $WORK)"

	step "build bin/qoscni and bin/qoscni-cnitool" step_build
	if [ $FAILED -ne 0 ]; then summary; return; fi
	write_conflist
	[ "$DEMO_PLUGIN" = ref ] || POD_CAPS[${PODS[0]}]=$SHAPED_CAPS
	POD_CAPS[${PODS[1]}]=$PORT_CAPS
	[ "$DEMO_PLUGIN" = ref ] || POD_CAPS[${PODS[1]}]=$CONTROL_CAPS
	step "create node and pod network namespaces" step_namespaces
	step "STATUS: plugin ready" step_status
	step "ADD ${PODS[0]}" step_add "${PODS[0]}" 1
	step "ADD ${PODS[1]}" step_add "${PODS[1]}" 2
	step "pod-to-pod ping, IPv4 and IPv6" step_ping_pods
	step "pod-to-gateway ping, IPv4 and IPv6" step_ping_gateway
	if [ "$DEMO_PLUGIN" != ref ]; then
		step "shaping pipeline of ${PODS[0]}: TBF on the host veth, u32+mirred to an IFB, TBF on the IFB" step_shaping_pipeline
		step "measured rates of ${PODS[0]} in both directions" step_shaping_rates
		step "qoscni-agent serves the pod's shaping metrics" step_metrics
	fi
	if [ "$DEMO_PLUGIN" != ref ]; then
		step "${PODS[1]}'s connection bound (Calico's annotation): a third connection refused" step_controls
	fi
	step "hostPort 8080 -> ${PODS[1]}:80 from the node (its address and 127.0.0.1)" step_hostport
	step "CHECK both attachments" step_check
	step "DEL both attachments" step_del
	step "nothing left: veths, IPAM, state, nftables elements, cache" step_nothing_left
	summary
}

summary() {
	echo
	log "summary"
	local r
	for r in "${RESULTS[@]}"; do
		case $r in
		PASS*) printf '  \033[32m%s\033[0m\n' "$r" ;;
		*) printf '  \033[31m%s\033[0m\n' "$r" ;;
		esac
	done
	if [ $FAILED -eq 0 ]; then
		printf '\n\033[1;32mDEMO PASS\033[0m\n'
	else
		printf '\n\033[1;31mDEMO FAIL\033[0m\n'
	fi
}

main "$@"
exit $FAILED
