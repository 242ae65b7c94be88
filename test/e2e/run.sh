#!/usr/bin/env bash
# Runs one end-to-end harness and ends with its summary line:
#
#   test/e2e/run.sh cri   containerd's CRI runs pods with qoscni (make e2e-cri)
#   test/e2e/run.sh k8s   a single-node Kubernetes runs qoscni from deploy/ (make e2e-k8s)
#
# Each harness is a Go test package whose TestMain (test/e2e/node) puts it on a
# node of its own: a network namespace with an uplink to a client namespace
# and a private mount namespace, so the machine is left as it was. The last
# lines are the timings the tests logged and
#   e2e: N passed, N failed (T s)
# where N counts tests and subtests. Extra arguments go to go test (-run ...).
set -euo pipefail
shopt -s inherit_errexit

cd "$(dirname "$0")/../.."
export PATH="$PATH:/usr/local/go/bin"
GO=${GO:-go}

harness=${1:-}
shift || true
case "$harness" in
cri) pkgs=(./test/e2e/node ./test/e2e/images ./test/e2e/containerd ./test/e2e/cri); export QOSCNI_E2E_NODE=1 QOSCNI_E2E_CRI=1 ;;
k8s) pkgs=(./test/e2e/k8s); export QOSCNI_E2E_K8S=1 ;;
*) echo "usage: test/e2e/run.sh cri|k8s [go test flags]" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "test/e2e/run.sh: needs root (namespaces, containerd, kubelet)" >&2; exit 1; }

log=$(mktemp /tmp/qoscni-e2e-$harness.XXXXXX.log)
# The logs of the processes a failed test started are kept beside it.
export QOSCNI_E2E_LOGDIR=${log%.log}.d
start=$SECONDS
# One package at a time: the shaping measurements want the machine.
set +e
$GO test -count=1 -p 1 -v -timeout 30m "$@" "${pkgs[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
passed=$(grep -cE '^\s*--- PASS:' "$log" || true)
failed=$(grep -cE '^\s*--- FAIL:' "$log" || true)
skipped=$(grep -cE '^\s*--- SKIP:' "$log" || true)
echo
echo "timings:"
grep -E 'timing: | took | ready in | in [0-9.]+m?s' "$log" | grep -vE '^\s*(---|===)' | sed -E 's/^\s+/  /' || true
# A package that failed to build or crashed has no --- FAIL line.
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
	failed=1
fi
echo "e2e: $passed passed, $failed failed${skipped:+, $skipped skipped} ($((SECONDS - start)) s, log $log)"
exit "$rc"
