#!/usr/bin/env bash
# Install what the tests, the demo and the benchmarks need on Debian 12,
# only when missing (apt-get update runs at most once), then fetch Go modules.
set -euo pipefail

. "$(dirname "$0")/lib.sh"

# iputils-ping: the demo proves connectivity with ping.
# iptables: kube-proxy's iptables mode (make e2e-k8s-iptables).
# containerd, runc: the e2e harnesses (make e2e-cri, e2e-k8s).
# gcc, libc6-dev: cgo, which go test -race needs (make race).
PACKAGES=(iproute2 nftables iptables iperf3 containernetworking-plugins conntrack iputils-ping curl python3 prometheus containerd runc gcc libc6-dev)

missing=()
for pkg in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) || status=""
	if [ "$status" != "install ok installed" ]; then
		missing+=("$pkg")
	fi
done

if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}; run 'make deps' as root"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
		apt-get update
		apt-get install -y --no-install-recommends "${missing[@]}"
	fi
fi

# br_netfilter: a standalone ADD refuses to wire pods without it (their
# Services would break, docs/install.md), and the kernel tests, the demo and
# the e2e harnesses run standalone ADDs. Built into some kernels; Debian's
# is a module, not loaded at boot.
if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
	[ "$(id -u)" -eq 0 ] || die "br_netfilter is not loaded; run 'make deps' as root, or: modprobe br_netfilter"
	if ! command -v modprobe >/dev/null; then
		export DEBIAN_FRONTEND=noninteractive
		apt-get install -y --no-install-recommends kmod || { apt-get update && apt-get install -y --no-install-recommends kmod; }
	fi
	log "loading br_netfilter"
	modprobe br_netfilter || die "modprobe br_netfilter failed: qoscni's standalone ADD needs it (docs/install.md)"
fi

command -v go >/dev/null || die "go not found (expected in PATH or /usr/local/go/bin)"
(cd "$QOSCNI_ROOT" && go mod download)
