#!/usr/bin/env bash
# Live reshaping benchmark (test/bench/reshape/main.go): time from a pod
# annotation change to the new rate in the kernel, p50/p99 over CHANGES
# changes on a node with PODS shaped pods (real plugin ADDs in a fresh node
# namespace, the agent's informer on a fake clientset, real tc); the cost
# of the periodic reconcile pass; agent CPU while nothing changes.
# Needs root. Goal: p99 <= 2 s, idle CPU near zero.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="/usr/local/go/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "test/bench/reshape.sh: must run as root" >&2; exit 1; }

mkdir -p bin
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o bin/qoscni ./cmd/qoscni
echo "## Live reshaping ($(nproc) cores, $(uname -r))"
echo
go run ./test/bench/reshape -plugin bin/qoscni -pods "${PODS:-100}" -changes "${CHANGES:-100}"
