#!/usr/bin/env bash
# The fault-tolerance demo: a witness, a backup and a primary running the
# built-in test guest on this machine, a console client following the
# primary; the primary is killed (kill -9) at a random moment and the
# backup takes over. Every role and client holds the same cluster key,
# made here with `ftvm keygen` (connections are authenticated and
# encrypted with it). Ends with one summary line:
#   failover_ms=<kill to first byte from the new primary> lost=<lines> duplicated=<lines> view=<final view>
# and exits non-zero if any line was lost or duplicated.
#
# Options (environment): SECONDS_RUN (guest run time, default 8),
# KILL_MIN_MS/KILL_MAX_MS (kill window after boot, default 2000-5000),
# BASE_PORT (default 7000: witness BASE, primary BASE+100, backup BASE+101),
# FTVM (binary; default: build target/release/ftvm), KEEP=1 keeps the work dir,
# WITNESS=etcd keeps the view in a 3-member etcd started for the demo
# (scripts/etcd-cluster.sh, client ports BASE+200..202) instead of `ftvm witness`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${FTVM:-}" ]; then
    scripts/setup.sh
    FTVM=$PWD/target/release/ftvm
fi
SECONDS_RUN=${SECONDS_RUN:-8}
KILL_MIN_MS=${KILL_MIN_MS:-2000}
KILL_MAX_MS=${KILL_MAX_MS:-5000}
BASE_PORT=${BASE_PORT:-7000}
W=127.0.0.1:$BASE_PORT
P=127.0.0.1:$((BASE_PORT + 100))
B=127.0.0.1:$((BASE_PORT + 101))
work=$(mktemp -d /tmp/ftvm-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "${WITNESS:-}" = etcd ] && scripts/etcd-cluster.sh stop "$work/etcd" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "demo: files kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
now_ms() { date +%s%3N; }
say() { echo "demo: $*" >&2; }

KEY=$work/cluster.key
"$FTVM" keygen --out "$KEY"
say "witness on $W, backup on $B, primary on $P; guest runs ${SECONDS_RUN}s; cluster key $KEY"
case ${WITNESS:-embedded} in
    etcd)
        W="$(scripts/etcd-cluster.sh start "$work/etcd" $((BASE_PORT + 200)))/ftvm/demo"
        say "the view is in etcd: $W"
        echo "(etcd: member logs in $work/etcd)" >"$work/witness.err" ;;
    embedded)
        "$FTVM" witness --listen "$W" --key "$KEY" 2>"$work/witness.err" & pids+=($!)
        sleep 0.3 ;;
    *) say "WITNESS must be embedded or etcd"; exit 2 ;;
esac
"$FTVM" backup --witness "$W" --listen "$B" --key "$KEY" >"$work/backup.out" 2>"$work/backup.err" & backup=$!; pids+=($backup)
sleep 0.3
"$FTVM" primary --witness "$W" --listen "$P" --key "$KEY" --no-stdin --cmdline "seconds=$SECONDS_RUN" \
    >"$work/primary.out" 2>"$work/primary.err" & primary=$!; pids+=($primary)
sleep 0.3
"$FTVM" console --witness "$W" --key "$KEY" --give-up 20 >"$work/console.out" 2>"$work/console.err" & console=$!; pids+=($console)

delay_ms=$((KILL_MIN_MS + RANDOM % (KILL_MAX_MS - KILL_MIN_MS + 1)))
sleep "$(awk -v ms="$delay_ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
say "status before the kill:"
"$FTVM" status --witness "$W" --key "$KEY" | sed 's/^/  /' >&2 || true
lines_before=$(grep -c '^\[[0-9]' "$work/console.out" || true)
kill_ms=$(now_ms)
kill -9 "$primary"
say "killed the primary (pid $primary) after ${delay_ms} ms, console had $lines_before lines"

console_rc=0
wait "$console" || console_rc=$?
wait "$backup" || true
say "status at the end:"
"$FTVM" status --witness "$W" --key "$KEY" | sed 's/^/  /' >&2 || true

echo "----- console (what the outside world saw) -----" >&2
cat "$work/console.out" >&2
echo "----- console client -----" >&2
cat "$work/console.err" >&2
echo "----- backup, then new primary -----" >&2
cat "$work/backup.err" >&2
echo "----- witness -----" >&2
cat "$work/witness.err" >&2
echo "------------------------------------------------" >&2

first_ms=$(sed -n 's/.*first output from new primary.*unix_ms=\([0-9]*\).*/\1/p' "$work/console.err" | head -1)
failover_ms=$([ -n "$first_ms" ] && echo $((first_ms - kill_ms)) || echo "none")
expected=$(sed -n 's/^\[done\] ticks=[0-9]* lines=\([0-9]*\) .*/\1/p' "$work/console.out" | head -1)
[ -n "$expected" ] || expected=$((SECONDS_RUN * 10))
read -r lost duplicated < <(grep -o '^\[[0-9]*\]' "$work/console.out" | tr -d '[]' | awk -v n="$expected" '
    { c[$1 + 0]++ }
    END { lost = 0; dup = 0
          for (i = 1; i <= n; i++) { if (!(i in c)) lost++; else if (c[i] > 1) dup += c[i] - 1 }
          print lost, dup }')
grep -q '^\[done\]' "$work/console.out" || lost=$((lost + 1))
view=$(sed -n 's/^view: //p' <("$FTVM" status --witness "$W" --key "$KEY" 2>/dev/null) || true)
[ "$console_rc" = 0 ] || say "console client exited with $console_rc"
echo "failover_ms=$failover_ms lost=$lost duplicated=$duplicated view=${view:-unknown}"
[ "$lost" = 0 ] && [ "$duplicated" = 0 ] && [ "$console_rc" = 0 ]
