#!/usr/bin/env bash
# Fuzzes every Fuzz* target of the repository (the fuzz_test.go files of
# netconf, shaping, state, ipam, portmap...) for FUZZTIME each, one after
# the other, and prints a markdown table of executions and results for
# docs/. The committed seed corpora under <pkg>/testdata/fuzz/ also run in
# every plain `go test`; this script is what searches beyond them.
#
# A target that fails leaves its failing input in
# <pkg>/testdata/fuzz/<FuzzName>/ (as go test does) and makes the script
# exit 1; re-run it with the `go test -run=...` line printed in the log.
# The fuzzer's own corpus grows in $(go env GOCACHE)/fuzz between runs.
#
# Environment:
#   FUZZTIME=60s      per target (go test -fuzztime: a duration, or Nx execs)
#   TARGETS=""        only these, as pkg:FuzzName or FuzzName (space-separated)
#   FUZZ_PARALLEL=""  fuzzing workers per target (go test -parallel; default GOMAXPROCS)
#   LOGDIR=""         keep each target's go test output here (default: a temp dir)
#   FUZZ_TMPDIR=/dev/shm  TMPDIR of the fuzzed tests (t.TempDir): the IPAM
#                     store target fsyncs, about 10x faster on tmpfs
set -euo pipefail

. "$(dirname "$0")/../../scripts/lib.sh"

FUZZTIME=${FUZZTIME:-60s}
TARGETS=${TARGETS:-}
FUZZ_PARALLEL=${FUZZ_PARALLEL:-}
FUZZ_TMPDIR=${FUZZ_TMPDIR:-/dev/shm}
[ -d "$FUZZ_TMPDIR" ] && [ -w "$FUZZ_TMPDIR" ] || FUZZ_TMPDIR=${TMPDIR:-/tmp}
cd "$QOSCNI_ROOT"

KEEP_LOGS=${LOGDIR:+1}
LOGDIR=${LOGDIR:-$(mktemp -d /tmp/qoscni-fuzz.XXXXXX)}
mkdir -p "$LOGDIR"
failed=0
# Logs of a failed run are kept for the stack traces.
cleanup() { [ -n "$KEEP_LOGS" ] || [ "$failed" -ne 0 ] || rm -rf "$LOGDIR"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# pkg<TAB>FuzzName for every target, from the source rather than a list,
# so a new target is fuzzed without editing this script.
discover() {
	find . -path ./test/e2e -prune -o -name '*_test.go' -print0 |
		xargs -0 grep -H -o -E '^func Fuzz[A-Za-z0-9_]*\(' |
		sed -E 's#^\./(.*)/[^/]+_test\.go:func (Fuzz[A-Za-z0-9_]*)\($#\1\t\2#' |
		sort -u
}

wanted() {
	local pkg=$1 name=$2 t
	[ -z "$TARGETS" ] && return 0
	for t in $TARGETS; do
		[ "$t" = "$name" ] || [ "$t" = "$pkg:$name" ] && return 0
	done
	return 1
}

mapfile -t ALL < <(discover)
[ "${#ALL[@]}" -gt 0 ] || die "no Fuzz* targets found"

RESULTS=$LOGDIR/results.tsv
: >"$RESULTS"
for line in "${ALL[@]}"; do
	pkg=${line%%$'\t'*}
	name=${line#*$'\t'}
	wanted "$pkg" "$name" || continue
	corpus=$pkg/testdata/fuzz/$name
	seeds=0
	[ -d "$corpus" ] && seeds=$(find "$corpus" -type f | wc -l)
	log "$pkg $name: fuzzing for $FUZZTIME ($seeds seeds)"
	out=$LOGDIR/$(echo "$pkg" | tr / _)_$name.log
	args=(-run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME")
	[ -n "$FUZZ_PARALLEL" ] && args+=(-parallel "$FUZZ_PARALLEL")
	start=$(date +%s)
	rc=0
	TMPDIR=$FUZZ_TMPDIR go test "${args[@]}" "./$pkg" >"$out" 2>&1 || rc=$?
	wall=$(($(date +%s) - start))

	# go test prints "fuzz: elapsed: 20s, execs: 123456 (6172/sec), new
	# interesting: 12 (total: 40)" every 3 s and once at the end.
	last=$(grep -E '^fuzz: elapsed: .*execs: [0-9]+' "$out" | tail -n 1 || true)
	execs=$(sed -nE 's/.*execs: ([0-9]+).*/\1/p' <<<"$last")
	# The final line reports 0/sec: average over the elapsed time instead.
	rate=$(sed -nE 's/^fuzz: elapsed: ([0-9hms]+),.*/\1/p' <<<"$last" | awk -v n="${execs:-0}" '{
		s = 0; d = $1
		while (match(d, /^[0-9]+[hms]/)) {
			v = substr(d, 1, RLENGTH - 1); u = substr(d, RLENGTH, 1); d = substr(d, RLENGTH + 1)
			s += v * (u == "h" ? 3600 : u == "m" ? 60 : 1)
		}
		if (s > 0) printf "%d", n / s
	}')
	newint=$(sed -nE 's/.*new interesting: ([0-9]+).*/\1/p' <<<"$last")
	input=""
	if [ "$rc" -eq 0 ]; then
		result=PASS
	elif grep -q 'Failing input written to' "$out"; then
		result=FAIL
		input=$(sed -nE 's/.*Failing input written to (.*)$/\1/p' "$out" | tail -n 1)
		input=$pkg/$input
	else
		result=ERROR # did not build, or the seed corpus already fails
	fi
	if [ "$result" != PASS ]; then
		failed=1
		warn "$pkg $name: $result${input:+, input in $input}"
		grep -E -- '--- FAIL|fuzz_test.go:[0-9]+:|panic:|Failing input|To re-run|go test -run' "$out" | awk 'NR <= 20' >&2 || true
	else
		info "${execs:-?} execs in ${wall}s wall"
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pkg" "$name" "$seeds" "${execs:--}" "${rate:--}" \
		"${newint:--}" "$result" "${input:--}" >>"$RESULTS"
done
[ -s "$RESULTS" ] || die "no target matches TARGETS=$TARGETS"

echo
echo "Fuzzing, $FUZZTIME per target, $(nproc) CPUs, $(go version | cut -d' ' -f3), $(date -u +%Y-%m-%d)"
echo
echo "| package | target | seeds | execs | execs/s | new interesting | result | failing input |"
echo "|---|---|--:|--:|--:|--:|---|---|"
awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8 }' "$RESULTS"
if [ -n "$KEEP_LOGS" ] || [ "$failed" -ne 0 ]; then
	echo
	echo "logs: $LOGDIR"
fi
exit "$failed"
