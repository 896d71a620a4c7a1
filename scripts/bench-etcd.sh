#!/usr/bin/env bash
# The etcd witness measured (tests/ft_etcd.rs bench_etcd): failover time
# (kill -9 of the primary -> first output of the new primary at `ftvm
# console`) with a 3-member etcd on loopback next to the embedded witness,
# alternating, every run checked whole; and the requests per second one
# protected VM (primary, backup, console) sends to etcd (all members,
# from their /metrics).
#
# Usage: scripts/bench-etcd.sh [KILLS]     (default 10 per witness)
# Prints:
#   failover_ms witness=embedded: n=.. p50=.. p99=.. max=.. all=[...]
#   failover_ms witness=etcd: n=.. p50=.. p99=.. max=.. all=[...]
#   etcd_requests_per_s one protected VM (primary + backup + console): N
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-10}
case $kills in ''|*[!0-9]*) echo "usage: $0 [KILLS]" >&2; exit 2 ;; esac
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
FTVM_BENCH_KILLS=$kills cargo test --release -p ftvm --test ft_etcd bench_etcd -- --ignored --nocapture >"$out" 2>&1 || status=$?
grep -E '^etcd bench|^failover_ms|^etcd_requests' "$out" || true
if [ "$status" -ne 0 ]; then
    tail -40 "$out" >&2
    exit "$status"
fi
