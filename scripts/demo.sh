#!/usr/bin/env bash
# End-to-end demo of qoscni in throw-away network namespaces:
#   a "node" netns (where the plugin runs, as under a runtime) and two pods.
# Steps: build, namespaces, ADD x2, pod<->pod and pod->gateway ping (v4+v6),
# CHECK, DEL x2, prove nothing is left. Prints PASS/FAIL per step and overall.
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
declare -A POD_ID=() POD_ADDED=() POD_V4=() POD_V6=()

cleanup() {
	local rc=$?
	set +e
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
		build_bins qoscni qoscni-cnitool
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
	cnitool "$NODE" add "${CNI_FLAGS[@]}" --id "${POD_ID[$p]}" --netns "/run/netns/$p" \
		--ifname "$IFNAME" --args "K8S_POD_NAMESPACE=default;K8S_POD_NAME=demo-$i;K8S_POD_UID=00000000-0000-0000-0000-00000000000$i" \
		>"$WORK/result-$p.json" || return 1
	sed 's/^/      /' "$WORK/result-$p.json"
	# Read the addresses back from the kernel, not from the result.
	POD_V4[$p]=$(ip -n "$p" -4 -o addr show dev "$IFNAME" scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
	POD_V6[$p]=$(ip -n "$p" -6 -o addr show dev "$IFNAME" scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
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
		gw4=$(ip -n "$p" -4 route show default | awk '/via/ {print $3; exit}')
		gw6=$(ip -n "$p" -6 route show default | awk '/via/ {print $3; exit}')
		info "$p default routes: v4 via ${gw4:-none}, v6 via ${gw6:-none}"
		ping_from "$p" 4 "$gw4" || rc=1
		ping_from "$p" 6 "$gw6" || rc=1
	done
	# The gateway addresses must be on the bridge in the node netns.
	ip -n "$NODE" -br addr show dev "$BRIDGE" | sed 's/^/      /'
	return $rc
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
	left=$(leftover_files "$CACHE_DIR")
	if [ -n "$left" ]; then warn "libcni cache entries left:"; echo "$left"; rc=1; else info "libcni cache is empty"; fi
	return $rc
}

main() {
	require_root
	command -v ping >/dev/null || die "ping not found: run 'make deps'"
	WORK=$(mktemp -d /tmp/qoscni-demo.XXXXXX)
	log "qoscni demo (plugin: $DEMO_PLUGIN, work dir $WORK)"

	step "build bin/qoscni and bin/qoscni-cnitool" step_build
	if [ $FAILED -ne 0 ]; then summary; return; fi
	write_conflist
	step "create node and pod network namespaces" step_namespaces
	step "STATUS: plugin ready" step_status
	step "ADD ${PODS[0]}" step_add "${PODS[0]}" 1
	step "ADD ${PODS[1]}" step_add "${PODS[1]}" 2
	step "pod-to-pod ping, IPv4 and IPv6" step_ping_pods
	step "pod-to-gateway ping, IPv4 and IPv6" step_ping_gateway
	step "CHECK both attachments" step_check
	step "DEL both attachments" step_del
	step "nothing left: veths, IPAM, state, cache" step_nothing_left
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
