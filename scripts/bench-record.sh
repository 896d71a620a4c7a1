#!/usr/bin/env bash
# Measures what recording costs: the built-in guest's work-bound burst mode
# run plain (`ftvm run`) and recorded (`ftvm record`), side by side, R
# rounds, then each recording replayed; plus one timer-paced recording to
# get the log's rate while the guest is mostly idle.
#
# Usage: scripts/bench-record.sh [-n ROUNDS] [-b BURST_LINES] [-s SECONDS]
#   -n R  rounds (default 5); the order of plain and record alternates
#         from round to round so warm-up or drift does not favour one
#   -b N  guest command line `burst=N` (default 3000)
#   -s S  the timer-paced recording's `seconds=S` (default 3)
# Environment: FTVM=path uses that binary instead of building
# target/release/ftvm.
#
# Needs bash, coreutils and python3 (wall and CPU time come from a tiny
# python wrapper: time.perf_counter_ns and getrusage(RUSAGE_CHILDREN)).
set -euo pipefail

BENCH_NAME=bench-record BENCH_USAGE=2,15
# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"
rounds=5 burst=3000 secs=3
bench_int_options "n:rounds b:burst s:secs" "$@"
bench_need python3 "apt-get install python3"
bench_ftvm
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then bench_die "need read/write access to /dev/kvm"; fi
bench_workdir

# timeit.py OUT ERR CMD...: runs CMD (stdin /dev/null), prints
# "wall_s cpu_s rc" with cpu = user + sys of the child.
cat >"$work/timeit.py" <<'EOF'
import resource, subprocess, sys, time
out, err, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "wb") as o, open(err, "wb") as e:
    t0 = time.perf_counter_ns()
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e).returncode
    t1 = time.perf_counter_ns()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{(t1 - t0) / 1e9:.6f} {ru.ru_utime + ru.ru_stime:.6f} {rc}")
EOF

results=$work/results.tsv
: >"$results"

# measure KIND ROUND OUT ERR CMD...: times CMD, fails loudly on a non-zero
# exit, and appends "KIND ROUND WALL CPU" to the results.
measure() {
    local kind=$1 round=$2 out=$3 err=$4
    shift 4
    local line wall cpu rc
    line=$(python3 "$work/timeit.py" "$out" "$err" "$@")
    read -r wall cpu rc <<<"$line"
    if [ "$rc" != 0 ]; then
        echo "bench-record: '$*' exited with status $rc; its stderr:" >&2
        tail -n 20 "$err" >&2
        exit 1
    fi
    printf '%s\t%s\t%s\t%s\n' "$kind" "$round" "$wall" "$cpu" >>"$results"
}

# check_done OUT: the guest got to its done line with all burst lines.
check_done() {
    if ! grep -q "^\[done\] .* lines=$burst " "$1"; then
        echo "bench-record: $1 lacks '[done] ... lines=$burst' (does this guest know burst=N?):" >&2
        tail -n 5 "$1" >&2
        exit 1
    fi
}

cmd="burst=$burst"
echo "bench-record: $rounds rounds of '$cmd' plain / recorded / replayed, then one recorded 'seconds=$secs'" >&2
for ((r = 1; r <= rounds; r++)); do
    d=$work/r$r
    mkdir "$d"
    if ((r % 2)); then order="plain record"; else order="record plain"; fi
    for k in $order; do
        case $k in
            plain) measure plain "$r" "$d/plain.out" "$d/plain.err" \
                       "$ftvm" run --no-stdin --cmdline "$cmd" ;;
            record) measure record "$r" "$d/record.out" "$d/record.err" \
                        "$ftvm" record --no-stdin --log "$d/log" --cmdline "$cmd" ;;
        esac
        check_done "$d/$k.out"
    done
    measure replay "$r" "$d/replay.out" "$d/replay.err" "$ftvm" replay --log "$d/log"
    if ! cmp -s "$d/record.out" "$d/replay.out" || ! grep -q "replay verified" "$d/replay.err"; then
        echo "bench-record: round $r: the replay did not reproduce the recording" >&2
        tail -n 5 "$d/replay.err" >&2
        exit 1
    fi
    "$ftvm" log stats "$d/log" >"$d/stats"
    rm -f -- "$d/log"
    echo "bench-record: round $r/$rounds done" >&2
done

d=$work/idle
mkdir "$d"
measure idle-record 1 "$d/record.out" "$d/record.err" \
    "$ftvm" record --no-stdin --log "$d/log" --cmdline "seconds=$secs"
measure idle-replay 1 "$d/replay.out" "$d/replay.err" "$ftvm" replay --log "$d/log"
if ! cmp -s "$d/record.out" "$d/replay.out" || ! grep -q "replay verified" "$d/replay.err"; then
    echo "bench-record: the seconds=$secs replay did not reproduce the recording" >&2
    tail -n 5 "$d/replay.err" >&2
    exit 1
fi
"$ftvm" log stats "$d/log" >"$d/stats"

# ---- host description ---------------------------------------------------
kvm_mods=""
for m in kvm kvm_intel kvm_amd kvm_pvm; do
    [ -d "/sys/module/$m" ] && kvm_mods+="$m "
done
if [ -z "$kvm_mods" ] && command -v lsmod >/dev/null; then
    kvm_mods=$(lsmod 2>/dev/null | awk '$1 ~ /^kvm/ {printf "%s ", $1}') || true
fi
case " $kvm_mods" in
    *" kvm_pvm "*) backend="PVM (kvm_pvm: paravirtualized KVM, no hardware virtualization needed)" ;;
    *" kvm_intel "*) backend="VMX (kvm_intel)" ;;
    *" kvm_amd "*) backend="SVM (kvm_amd)" ;;
    *) backend="unknown (no kvm_* module visible in /sys/module)" ;;
esac
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1) || true
if grep -qw hypervisor /proc/cpuinfo 2>/dev/null; then
    nested="yes (cpuinfo 'hypervisor' flag: this host is itself a VM)"
else
    nested="no hypervisor flag"
fi

export BENCH_TMP=$work BENCH_ROUNDS=$rounds BENCH_BURST=$burst BENCH_SECS=$secs
export BENCH_HOST_KERNEL=$(uname -r) BENCH_HOST_NPROC=$(nproc)
export BENCH_HOST_CPU=${cpu_model:-unknown} BENCH_HOST_BACKEND=$backend
export BENCH_HOST_MODS=${kvm_mods:-none} BENCH_HOST_NESTED=$nested
export BENCH_FTVM=$ftvm
python3 - <<'EOF'
import os, re, statistics as st

tmp = os.environ["BENCH_TMP"]
rounds = int(os.environ["BENCH_ROUNDS"])
E = os.environ

res = {}
for line in open(os.path.join(tmp, "results.tsv")):
    kind, rnd, wall, cpu = line.split()
    res.setdefault(kind, {})[int(rnd)] = (float(wall), float(cpu))

def stats_file(path):
    t = open(path).read()
    m = re.search(r"records:\s*(\d+)\s+bytes:\s*(\d+)", t)
    g = re.search(r"guest time:\s*([\d.]+)\s*s\s+log rate:\s*([\d.]+)\s*bytes/s\s*\(([\d.]+)\s*Mbit/s\)\s+events/s:\s*([\d.]+)", t)
    if not m or not g:
        raise SystemExit(f"bench-record: cannot parse `ftvm log stats` output:\n{t}")
    return dict(records=int(m[1]), bytes=int(m[2]), guest_s=float(g[1]),
                rate=float(g[2]), mbit=float(g[3]), evps=float(g[4]))

def exits(path):
    m = re.search(r"(\d+) exits", open(path).read())
    return int(m[1]) if m else None

def row(name, vals, unit="s", p=3):
    return f"  {name:<26} {st.median(vals):9.{p}f} {min(vals):9.{p}f} {max(vals):9.{p}f}  {unit}".rstrip()

R = range(1, rounds + 1)
pw = [res["plain"][r][0] for r in R]; pc = [res["plain"][r][1] for r in R]
rw = [res["record"][r][0] for r in R]; rc = [res["record"][r][1] for r in R]
yw = [res["replay"][r][0] for r in R]; yc = [res["replay"][r][1] for r in R]
bs = [stats_file(os.path.join(tmp, f"r{r}", "stats")) for r in R]
px = [exits(os.path.join(tmp, f"r{r}", "plain.err")) for r in R]
rx = [exits(os.path.join(tmp, f"r{r}", "record.err")) for r in R]
idle = stats_file(os.path.join(tmp, "idle", "stats"))
iw, ic = res["idle-record"][1]
yiw, yic = res["idle-replay"][1]

print("ftvm record overhead benchmark")
print(f"host: linux {E['BENCH_HOST_KERNEL']}, {E['BENCH_HOST_NPROC']} CPUs ({E['BENCH_HOST_CPU']})")
print(f"      KVM backend: {E['BENCH_HOST_BACKEND']}; modules: {E['BENCH_HOST_MODS'].strip()}")
print(f"      nested: {E['BENCH_HOST_NESTED']}")
print(f"binary: {E['BENCH_FTVM']}; guest: burst={E['BENCH_BURST']}; {rounds} rounds, "
      f"plain/record order alternating")
print()
print(f"  {'burst workload (wall)':<26} {'median':>9} {'min':>9} {'max':>9}")
print(row("plain run", pw))
print(row("record", rw))
print(row("replay of that log", yw))
print(f"  {'burst workload (user+sys)':<26} {'median':>9} {'min':>9} {'max':>9}")
print(row("plain run", pc))
print(row("record", rc))
print(row("replay of that log", yc))
print()
pair = [b / a for a, b in zip(pw, rw)]
print(f"  record/plain wall:  {st.median(rw) / st.median(pw):.3f} (ratio of medians), "
      f"{st.median(pair):.3f} (median of per-round ratios, range {min(pair):.3f}-{max(pair):.3f})")
print(f"  record/plain CPU:   {st.median(rc) / st.median(pc):.3f} (ratio of medians)")
print(f"  replay/record wall: {st.median(yw) / st.median(rw):.3f}, CPU: {st.median(yc) / st.median(rc):.3f} (ratio of medians)")
if all(px) and all(rx):
    mx_p, mx_r = st.median(px), st.median(rx)
    print(f"  VM exits per run:   plain {mx_p:.0f}, record {mx_r:.0f}; wall per exit: "
          f"plain {st.median(pw) / mx_p * 1e6:.2f} us, record {st.median(rw) / mx_r * 1e6:.2f} us, "
          f"record extra {(st.median(rw) - st.median(pw)) / mx_r * 1e6:.2f} us")
print()
print(f"  {'log of the burst recordings':<26} {'median':>9} {'min':>9} {'max':>9}")
print(row("guest time", [b["guest_s"] for b in bs]))
print(row("log size", [b["bytes"] / 1024 for b in bs], "KiB"))
print(row("records", [b["records"] for b in bs], "", 0))
print(row("events / s guest time", [b["evps"] for b in bs], "1/s", 0))
print(row("log bytes / s guest time", [b["rate"] for b in bs], "B/s", 0))
print()
print(f"  timer-paced recording, seconds={E['BENCH_SECS']} (one run):")
print(f"    guest time {idle['guest_s']:.3f} s, {idle['records']} records, {idle['bytes']} bytes")
print(f"    events/s {idle['evps']:.1f}, log rate {idle['rate']:.1f} bytes/s ({idle['mbit']:.4f} Mbit/s)")
print(f"    record wall {iw:.3f} s (CPU {ic:.3f} s), replay wall {yiw:.3f} s (CPU {yic:.3f} s), "
      f"replay/record {yiw / iw:.3f}")
EOF
