#!/usr/bin/env bash
# Fault-tolerance benchmark: runs witness / backup / primary / console on this
# machine, several times, and prints
#   1. failover time (kill -9 of the primary -> first byte from the new
#      primary at `ftvm console`), p50/p90/p99/max, and lost/duplicated lines;
#   2. the latency the output rule adds to console output: line arrival at a
#      console client of our own, FT primary with a live backup vs an FT
#      primary alone in its view (interleaved);
#   3. backup lag in exits (`ftvm status` every 100 ms), p50/max;
#   4. guest progress, plain `ftvm run` vs FT primary with a live backup, on
#      a work-bound guest (burst=N, or a fast timer-paced one if the guest
#      has no burst mode), interleaved; ratio plain/FT;
#   5. log bandwidth (bytes logged / guest second, and Mbit/s);
# then how busy other processes kept the CPUs meanwhile (with a warning when
# that skews the timings), a summary table and any problems seen. Exits 1 if
# there were problems (lost/duplicated lines, failed runs), 130 when
# interrupted.
#
# Usage: scripts/bench-ft.sh [options]
#   -k N          failover runs (default 10)
#   -r N          latency rounds; each is one run with and one without a backup (default 4)
#   -s N          guest seconds of each latency run (default 5)
#   -p N          progress rounds; each is a plain run, an FT run with a backup and one
#                 without (default 3)
#   -b N          burst lines of the work-bound guest (default 3000)
#   -w CMDLINE    work-bound guest command line instead of burst=N
#   -o LIST       only these sections, e.g. 1 or 2,3,5 (default 1,2,3,4,5)
#   -f SECONDS    guest seconds of each failover run (default 5)
#   -K MIN-MAX    kill window in ms after the primary starts (default 1000-3000)
#   -S SEED       random seed (kill moments)
#   -j FILE       also write the raw results as JSON
#   -x            keep the work directory (process logs of every run)
#   -n            don't build: use target/release/ftvm as it is
# Environment: FTVM=path/to/ftvm (skips the build).
# Every process started is killed on exit, Ctrl-C included. Ports are picked
# free for each run. Needs python3 (standard library only).
set -euo pipefail

BENCH_NAME=bench-ft BENCH_USAGE='2,/^# Every process/' BENCH_RC=2
# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

K=10 ROUNDS=4 LSECS=5 PROUNDS=3 BURST=3000 WORKLOAD='' ONLY=1,2,3,4,5 FSECS=5 KWIN=1000-3000 SEED='' JSON='' BENCH_KEEP=0 BUILD=1
while getopts "k:r:s:p:b:w:o:f:K:S:j:xnh" opt; do
    case $opt in
        k) K=$OPTARG ;; r) ROUNDS=$OPTARG ;; s) LSECS=$OPTARG ;; p) PROUNDS=$OPTARG ;;
        b) BURST=$OPTARG ;; w) WORKLOAD=$OPTARG ;; o) ONLY=$OPTARG ;; f) FSECS=$OPTARG ;;
        K) KWIN=$OPTARG ;; S) SEED=$OPTARG ;; j) JSON=$OPTARG ;; x) BENCH_KEEP=1 ;; n) BUILD=0 ;;
        h) usage 0 ;; *) usage 2 >&2 ;;
    esac
done
[[ $KWIN =~ ^([0-9]+)-([0-9]+)$ ]] || { echo "bench-ft: -K wants MIN-MAX in ms" >&2; exit 2; }
KMIN=${BASH_REMATCH[1]} KMAX=${BASH_REMATCH[2]}
bench_need python3 "apt-get install python3"
if [ "$BUILD" = 1 ]; then bench_ftvm --locked --workspace; else bench_ftvm --no-build; fi
FTVM=$ftvm

py=
pidfile=
# shellcheck disable=SC2317 # run on exit, by bench_cleanup
bench_on_exit() {
    if [ -n "$py" ] && kill -0 "$py" 2>/dev/null; then
        kill -TERM "$py" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$py" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$py" 2>/dev/null || true
    fi
    # Anything the helper started and did not reap (only if it is still an ftvm of ours).
    [ -f "$pidfile" ] || return 0
    while read -r pid; do
        [ -n "$pid" ] || continue
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$FTVM"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done <"$pidfile"
}
bench_workdir
trap 'exit 130' INT TERM HUP
pidfile=$work/pids
: >"$pidfile"

echo "== Host"
echo "  kernel:  $(uname -r) ($(uname -m))"
echo "  cpus:    $(nproc)  ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1))"
if [ -e /dev/kvm ]; then
    kvm="yes"; { [ -r /dev/kvm ] && [ -w /dev/kvm ]; } || kvm="yes, but not read/writable by $(id -un)"
else kvm="no"; fi
echo "  /dev/kvm: $kvm"
echo "  load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min; other busy processes skew the timings)"
echo "  memory:  $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
echo "  ftvm:    $FTVM ($(stat -c %y "$FTVM" | cut -d. -f1))"
echo "  git:     $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- vmm replay-log guest 2>/dev/null || echo ' + uncommitted changes')"
echo "  options: -k $K -r $ROUNDS -s $LSECS -p $PROUNDS -b $BURST${WORKLOAD:+ -w '$WORKLOAD'} -o $ONLY -f $FSECS -K $KMIN-$KMAX"
[ -e /dev/kvm ] || { echo "bench-ft: /dev/kvm does not exist; ftvm needs KVM" >&2; exit 2; }

# Every FT connection is authenticated with a cluster key: one per bench.
"$FTVM" keygen --out "$work/cluster.key" 2>/dev/null
args=(--ftvm "$FTVM" --key "$work/cluster.key" --work "$work" --pidfile "$pidfile" -k "$K" --failover-seconds "$FSECS"
      --kill-min-ms "$KMIN" --kill-max-ms "$KMAX" --latency-rounds "$ROUNDS" --latency-seconds "$LSECS"
      --progress-rounds "$PROUNDS" --burst "$BURST" --only "$ONLY")
[ -z "$WORKLOAD" ] || args+=(--workload "$WORKLOAD")
[ -z "$SEED" ] || args+=(--seed "$SEED")
[ -z "$JSON" ] || args+=(--json "$JSON")

start=$(date +%s)
python3 -u scripts/bench_ft.py "${args[@]}" &
py=$!
rc=0
wait "$py" || rc=$?
# (`wait` returns early when a trapped signal arrives; the EXIT trap then stops the helper.)
py=
echo "bench-ft: total $(( $(date +%s) - start )) s; load average now $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exit "$rc"
