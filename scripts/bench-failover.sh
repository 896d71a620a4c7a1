#!/usr/bin/env bash
# Failover time (kill -9 of the primary -> first output of the new primary at
# `ftvm console`), p50/p99/max, with the log stream to the backup as it is and
# slowed to 20 ms per receive (a forwarder into the backup's own network
# namespace, see tests/ft_chaos.rs; needs root for the namespaces, else both
# cases run on plain loopback). Test guest, seconds=5, kill 1-3 s after the
# primary starts, two clusters at a time, every run checked whole
# (every line once, checksum chain unbroken).
#
# Usage: scripts/bench-failover.sh [KILLS]     (default 20 per case)
# Prints one line per case:
#   failover_ms (log stream as is): n=20 p50=... p99=... max=... failed=0 all=[...]
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-20}
case $kills in ''|*[!0-9]*) echo "usage: $0 [KILLS]" >&2; exit 2 ;; esac
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
FTVM_BENCH_KILLS=$kills cargo test --release -p ftvm --test ft_chaos bench_failover -- --ignored --nocapture >"$out" 2>&1 || status=$?
grep -E '^failover bench|^failover_ms' "$out" || true
if [ "$status" -ne 0 ]; then
    tail -40 "$out" >&2
    exit "$status"
fi
grep -q 'failed=0' "$out" && ! grep 'failover_ms' "$out" | grep -qv 'failed=0'
