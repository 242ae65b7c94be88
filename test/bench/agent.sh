#!/usr/bin/env bash
# Node agent benchmark: /metrics latency and agent RSS with 1, 100 and 500
# shaped pods (test/bench/agent/main.go), and the plugin's per-call journal cost
# (journal.BenchmarkRecordCall). Needs root. POPULATIONS and SCRAPES adjust it.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="/usr/local/go/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "test/bench/agent.sh: must run as root" >&2; exit 1; }

mkdir -p bin
CGO_ENABLED=0 go build -tags grpcnotrace -trimpath -ldflags "-s -w" -o bin/qoscni-agent ./cmd/qoscni-agent
echo "## Agent scrape ($(nproc) cores, $(uname -r))"
echo
go run ./test/bench/agent -agent bin/qoscni-agent -pods "${POPULATIONS:-1,100,500}" -scrapes "${SCRAPES:-50}"
echo
echo "## Plugin per-call journal cost"
echo
go test -run '^$' -bench BenchmarkRecordCall -benchtime 20000x -count 5 -benchmem ./journal | grep -E '^Benchmark' |
	awk 'BEGIN{print "| run | ns/op | B/op | allocs/op |"; print "|---:|---:|---:|---:|"} {print "| " NR " | " $3 " | " $5 " | " $7 " |"}'
