#!/usr/bin/env bash
# Catch-up time of a backup that joins a running VM (state transfer):
# a witness and a primary running the test guest at hz=1000 alone for
# each of the run times given, then a backup joins; the time from starting
# `ftvm backup` until the witness shows it holding the state and its
# acknowledgements at the exit the primary was at when it started.
#
# usage: scripts/bench-catchup.sh [-a SECONDS] [-b SECONDS] [-r ROUNDS]
#   -a  the shorter run before the join (default 20)
#   -b  the longer run before the join (default 120)
#   -r  rounds of each (default 1), interleaved
# Prints one line per join and a summary line on stderr:
#   catchup short_s=A long_s=B short_ms=<median> long_ms=<median>
# FTVM=path measures that binary (default: build target/release/ftvm).
BENCH_NAME=bench-catchup
BENCH_USAGE=2,14
# shellcheck source=lib/bench.sh
. "$(dirname "$0")/lib/bench.sh"
SHORT=20 LONG=120 ROUNDS=1
bench_int_options "a:SHORT b:LONG r:ROUNDS" "$@"
bench_ftvm
bench_workdir
pids=()
bench_on_exit() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
"$ftvm" keygen --out "$work/key" 2>/dev/null
port=$((20000 + RANDOM % 20000))

# status W FIELD: a line of `ftvm status`
status() { "$ftvm" status --witness "$1" --key "$work/key" 2>/dev/null; }

# join_after SECONDS: prints the catch-up in ms
join_after() {
    local run=$1 w=127.0.0.1:$port p=127.0.0.1:$((port + 1)) b=127.0.0.1:$((port + 2)) at t0 t1 s acked
    port=$((port + 3))
    "$ftvm" witness --listen "$w" --key "$work/key" 2>"$work/w.err" & pids+=($!)
    sleep 0.3
    "$ftvm" primary --witness "$w" --listen "$p" --key "$work/key" --no-stdin --cmdline "seconds=$((run + 30)) hz=1000" >/dev/null 2>"$work/p.err" & pids+=($!)
    sleep "$run"
    at=$(status "$w" | sed -n 's/^log: primary at exit #\([0-9]*\),.*/\1/p')
    t0=$(date +%s%3N)
    "$ftvm" backup --witness "$w" --listen "$b" --key "$work/key" >/dev/null 2>"$work/b.err" & pids+=($!)
    while :; do
        s=$(status "$w")
        acked=$(sed -n 's/.*backup acknowledged #\([0-9]*\) .*/\1/p' <<<"$s")
        if grep -q "holds the state" <<<"$s" && [ "${acked:-0}" -ge "$at" ]; then break; fi
        if (($(date +%s%3N) - t0 > 120000)); then bench_die "no catch-up after 120 s: $s"; fi
        sleep 0.02
    done
    t1=$(date +%s%3N)
    bench_on_exit
    pids=()
    bench_err "joined after ${run}s of run (primary at exit #$at): caught up in $((t1 - t0)) ms"
    echo $((t1 - t0))
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}'; }
short=() long=()
for ((i = 0; i < ROUNDS; i++)); do
    short+=("$(join_after "$SHORT")")
    long+=("$(join_after "$LONG")")
done
echo "catchup short_s=$SHORT long_s=$LONG short_ms=$(printf '%s\n' "${short[@]}" | median) long_ms=$(printf '%s\n' "${long[@]}" | median)" >&2
