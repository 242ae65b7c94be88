#!/usr/bin/env bash
# The floor under the plugin's ADD and DEL on this machine (issue 21): an
# empty static Go binary's exec to exit (and /bin/true's, and the plugin's
# own VERSION call), one veth pair's and one IFB's deletion (alone, in a
# row, and at once from two sockets), one durable write in the state
# dir's filesystem. Prints a markdown table for docs/benchmarks.md.
#
# Environment: SAMPLES=40, DIR=/var/lib/cni (where the durable writes go).
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

require_root
WORK=$(mktemp -d /tmp/qoscni-floor.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
build_bins qoscni
mkdir -p "${DIR:-/var/lib/cni}"
(cd "$QOSCNI_ROOT" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$WORK/empty" ./test/bench/floor/empty &&
	CGO_ENABLED=0 go build -trimpath -o "$WORK/floor" ./test/bench/floor)
"$WORK/floor" -n "${SAMPLES:-40}" -empty "$WORK/empty" -plugin "$QOSCNI_ROOT/bin/qoscni" -dir "${DIR:-/var/lib/cni}"
