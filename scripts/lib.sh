# shellcheck shell=bash
# Shared helpers for scripts/ and test/bench/. Source it; it sets no shell options.

# Repository root, whatever the caller's working directory.
QOSCNI_ROOT=${QOSCNI_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"

# Where the reference plugins of Debian's containernetworking-plugins live.
REF_CNI_DIR=${REF_CNI_DIR:-/usr/lib/cni}

log()  { printf '\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf '\033[33mWARN: %s\033[0m\n' "$*" >&2; }
die()  { printf '\033[31mERROR: %s\033[0m\n' "$*" >&2; exit 1; }

require_root() {
	[ "$(id -u)" -eq 0 ] || die "$0 needs root (network namespaces, links, nftables)"
}

# build_bins [qoscni] [qoscni-cnitool]: go build into bin/. Static, stripped
# binaries (as `make build` makes them): the plugin starts once per pod event,
# and the dynamic loader alone costs it about 3 ms.
build_bins() {
	local b
	for b in "$@"; do
		(cd "$QOSCNI_ROOT" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "bin/$b" "./cmd/$b") || return 1
	done
}

# netns_fresh NAME: (re)create a network namespace with loopback up.
netns_fresh() {
	ip netns del "$1" 2>/dev/null || true
	ip netns add "$1" && ip -n "$1" link set lo up
}

netns_gone() { ip netns del "$1" 2>/dev/null || true; }

# cnitool NODE_NETNS ARGS...: run bin/qoscni-cnitool inside the node netns,
# which is where a runtime would run the plugin.
cnitool() {
	local node=$1
	shift
	ip netns exec "$node" "$QOSCNI_ROOT/bin/qoscni-cnitool" "$@"
}

# leftover_reservations DIR: files an IPAM store keeps per allocated address
# or attachment. host-local and the built-in store both keep "lock" and
# "last_reserved_ip.N" hints, which are not reservations.
leftover_reservations() {
	[ -d "$1" ] || return 0
	find "$1" -type f ! -name lock ! -name 'last_reserved_ip.*' -print
}

# leftover_files DIR: any regular file other than a lock.
leftover_files() {
	[ -d "$1" ] || return 0
	find "$1" -type f ! -name lock ! -name '*.lock' -print
}

# first_addr: the address (without prefix length) of the first line of
# `ip -o addr show` on stdin. It reads its whole input: a reader that stops
# early (head, grep -q, awk exit) kills a producer that writes again with
# SIGPIPE, and pipefail turns that into a failure at random.
first_addr() { awk 'NR == 1 { split($4, a, "/"); print a[1] }'; }

# json_field PATH: read a dotted path from JSON on stdin (python3 is on
# every Debian machine this runs on).
json_field() {
	python3 -c 'import json,sys
v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1" 2>/dev/null
}
