#!/usr/bin/env bash
# Measures what recording costs a Linux guest, in the lab (scripts/lab.sh: a
# real kvm-amd inside QEMU's TCG emulator), in ONE lab session on one kernel
# and initramfs (guest/linux/out/): R rounds, the order rotated each round,
# of
#   ftvm run      --no-stdin --cmdline "ftvm.poweroff=1 quiet"
#   ftvm record   the same, with a log
#   qemu (KVM)    -M isapc,kernel-irqchip=off -cpu qemu64,-apic,-x2apic,-tsc,-rdtscp,
#                 the same kernel (bzImage, through SeaBIOS) and command line
# timing each to FTVM-LINUX-UP (the guest's init reached userspace), to the
# kernel's power-off line and to the process's exit; then one recording that
# boots and idles in the guest's shell for IDLE seconds, for the log rate
# while idle. Prints a table: medians, every value, record/run ratios, log
# rates. Times are the lab's wall clock: a nested, emulated machine, far
# slower than real hardware; only the ratios mean something.
#
# Usage: scripts/bench-linux.sh [-n ROUNDS] [-i IDLE_SECONDS] [-t LAB_TIMEOUT]
#   -n R  rounds (default 3)
#   -i S  seconds the idle recording idles in the shell (default 10)
#   -t T  hard limit for the whole lab session, seconds (default 900)
# Environment: FTVM=path uses that binary instead of building
# target/release/ftvm. Keeps the lab's raw output in build/bench-linux.out.
set -euo pipefail

BENCH_NAME=bench-linux BENCH_USAGE=2,22
# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"
rounds=3 idle=10 timeout=900
bench_int_options "n:rounds i:idle t:timeout" "$@"
ROOT=$BENCH_ROOT
bench_ftvm

OUT=$ROOT/guest/linux/out
if [ ! -s "$OUT/vmlinux" ] || [ ! -s "$OUT/bzImage" ] || [ ! -s "$OUT/initramfs.cpio.gz" ]; then
    echo "bench-linux: building the Linux guest (scripts/linux-guest.sh)" >&2
    scripts/linux-guest.sh >&2
fi

# QEMU for inside the lab: the binary (lab.sh adds its shared libraries) and
# the firmware it loads, from the data directories it searches (-L help:
# paths relative to the binary, e.g. /usr/bin/../share/qemu and
# /usr/bin/../share/seabios), symlinks followed. -nographic needs no keymap.
bench_need qemu-system-x86_64 "apt-get install qemu-system-x86; scripts/lab.sh needs it too"
qemu=$(command -v qemu-system-x86_64)
qfiles=(--file "$(realpath "$qemu"):$qemu")
mapfile -t qdirs < <("$qemu" -L help 2>/dev/null)
want=(bios.bin bios-256k.bin linuxboot.bin linuxboot_dma.bin kvmvapic.bin pvh.bin
      multiboot.bin multiboot_dma.bin sgabios.bin vgabios.bin vgabios-isavga.bin
      vgabios-stdvga.bin vgabios-cirrus.bin)
declare -A found=()
for d in "${qdirs[@]}"; do
    [ -d "$d" ] || continue
    nd=$(realpath -m "$d")
    for f in "${want[@]}"; do
        if [ -z "${found[$f]:-}" ] && [ -e "$d/$f" ]; then
            found[$f]=1
            qfiles+=(--file "$(realpath "$d/$f"):$nd/$f")
        fi
    done
done
for f in bios.bin linuxboot_dma.bin linuxboot.bin kvmvapic.bin; do
    [ -n "${found[$f]:-}" ] || { echo "bench-linux: QEMU firmware $f not found in: ${qdirs[*]}" >&2; exit 1; }
done

mkdir -p build
raw=$ROOT/build/bench-linux.out
echo "bench-linux: one lab session: $rounds rounds of ftvm run / ftvm record / qemu-kvm, then a recording idle for ${idle}s (lab timeout ${timeout}s)" >&2
start=$(date +%s)
set +e
scripts/lab.sh --timeout "$timeout" --ftvm "$ftvm" \
    --file "$OUT/vmlinux:/g/vmlinux" \
    --file "$OUT/bzImage:/g/bzImage" \
    --file "$OUT/initramfs.cpio.gz:/g/initrd" \
    --file "$ROOT/scripts/bench-linux-lab.sh:/bench-linux-lab.sh" \
    "${qfiles[@]}" \
    -- sh /bench-linux-lab.sh "$rounds" "$idle" | tee "$raw" | sed -u 's/^/lab| /' >&2
rcs=("${PIPESTATUS[@]}")
set -e
elapsed=$(($(date +%s) - start))
if [ "${rcs[0]}" != 0 ]; then
    echo "bench-linux: the lab failed (status ${rcs[0]}); raw output in $raw" >&2
    exit 1
fi

kver=$(sed -n 's/^ *\(linux-image[^ ]*\) .*/\1/p' "$OUT/VERSION" 2>/dev/null | head -1)
kver=${kver:-$(head -1 "$OUT/VERSION" 2>/dev/null)}

awk -v rounds="$rounds" -v idle="$idle" -v elapsed="$elapsed" -v kver="$kver" '
function sortv(a, n,    i, j, t) { for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t } }
function median(a, n,    b, i) { if (n == 0) return "NA"; for (i = 1; i <= n; i++) b[i] = a[i]; sortv(b, n); return (n % 2) ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2 }
function kv(s, key,    i, n, p) { n = split(s, p, " "); for (i = 1; i <= n; i++) if (index(p[i], key "=") == 1) return substr(p[i], length(key) + 2); return "" }
function fmt(x, p) { return (x == "NA" || x == "") ? "NA" : sprintf("%." p "f", x) }
# collect values of mode m / field f (seconds) into arr; returns the count
function collect(m, f, arr,    r, n, v) { n = 0; for (r = 1; r <= rounds; r++) { v = T[m, f, r]; if (v != "" && v != "NA") arr[++n] = v / 100 } return n }
/^NOTE / { notes[++nn] = substr($0, 6); next }
/^FAIL / { fails[++nf] = substr($0, 6); next }
/^RESULT / {
    r = kv($0, "round"); m = kv($0, "mode")
    if (r == "idle") { IU = kv($0, "up"); IO = kv($0, "off"); IE = kv($0, "exit"); IRC = kv($0, "rc"); next }
    T[m, "up", r] = kv($0, "up"); T[m, "off", r] = kv($0, "off"); T[m, "exit", r] = kv($0, "exit"); RC[m, r] = kv($0, "rc")
    if (kv($0, "rc") != 0) bad++
    if (kv($0, "killed_at_halt") == 1) KH[m]++
    next
}
/^LOGSTAT / {
    r = kv($0, "round")
    if ($0 ~ /guest time:/) { s = $0; sub(/.*guest time: */, "", s); split(s, w, " "); GT[r] = w[1]; s = $0; sub(/.*log rate: */, "", s); split(s, w, " "); LR[r] = w[1] }
    if ($0 ~ / records: /) { s = $0; sub(/.* bytes: */, "", s); split(s, w, " "); LB[r] = w[1]; s = $0; sub(/.* records: */, "", s); split(s, w, " "); LN[r] = w[1] }
    if ($0 ~ / file: /) { s = $0; sub(/.* file: */, "", s); split(s, w, " "); LF[r] = w[1] }
    if ($0 ~ / complete: /) { s = $0; sub(/.* complete: */, "", s); LC[r] = s }
    next
}
/^IDLE stats guest time:/ { s = $0; sub(/.*guest time: */, "", s); split(s, w, " "); IGT = w[1]; s = $0; sub(/.*log rate: */, "", s); split(s, w, " "); ILR = w[1]; next }
/^IDLE stats records:/ { s = $0; sub(/.* bytes: */, "", s); split(s, w, " "); IB = w[1]; next }
/^IDLE dump / { DB = kv($0, "bytes"); next }
/^IDLE split before/ { BIN = kv($0, "before_input_bytes"); TIN = kv($0, "before_input_ns"); IDB = kv($0, "idle_bytes"); IDN = kv($0, "idle_ns"); IDR = kv($0, "idle_records"); next }
/^IDLE split none/ { nosplit = 1; next }
END {
    name["run"] = "ftvm run"; name["record"] = "ftvm record"; name["qemu"] = "qemu -accel kvm"
    what["up"] = "to FTVM-LINUX-UP"; what["off"] = "to power-off line"; what["exit"] = "to process exit"
    print ""
    print "=== ftvm: Linux boot in the lab, plain vs recorded vs QEMU-KVM ==="
    printf "guest: %s, 256 MiB, cmdline \"ftvm.poweroff=1 quiet\" (+ ftvm'"'"'s fixed parameters); %d rounds, order rotated each round\n", kver, rounds
    for (i = 1; i <= nn; i++) print "  " notes[i]
    print ""
    print "CAVEAT: the lab is a nested, emulated machine (kvm-amd inside QEMU TCG on this host);"
    print "absolute times are far slower than on real hardware. Only the ratios mean something."
    print ""
    printf "%-16s %-19s %8s   %s\n", "wall time (s)", "", "median", "all rounds (1.." rounds ")"
    split("run record qemu", modes, " "); split("up off exit", fields, " ")
    for (mi = 1; mi <= 3; mi++) for (fi = 1; fi <= 3; fi++) {
        m = modes[mi]; f = fields[fi]; delete a; n = collect(m, f, a)
        line = ""; for (r = 1; r <= rounds; r++) { v = T[m, f, r]; line = line sprintf(" %7s", (v == "" || v == "NA") ? "NA" : sprintf("%.2f", v / 100)) }
        printf "%-16s %-19s %8s  %s\n", (fi == 1 ? name[m] : ""), what[f], fmt(median(a, n), 2), line
        MED[m, f] = median(a, n)
    }
    if (KH["qemu"]) printf "  (qemu: %d of %d runs halted without powering off, as isapc has no ACPI, and were stopped at\n   the halt line: their exit time is that line'"'"'s time, not comparable with ftvm'"'"'s exit)\n", KH["qemu"], rounds
    print ""
    printf "%-16s %-19s %8s %8s   %s\n", "ratio", "", "of med.", "med.", "per round"
    split("record/run qemu/run", pairs, " ")
    for (pi = 1; pi <= 2; pi++) {
        split(pairs[pi], pm, "/")
        for (fi = 1; fi <= 3; fi++) {
            f = fields[fi]; delete q; nq = 0; line = ""
            for (r = 1; r <= rounds; r++) {
                x = T[pm[1], f, r]; y = T[pm[2], f, r]
                if (x != "" && x != "NA" && y != "" && y != "NA" && y > 0) { q[++nq] = x / y; line = line sprintf(" %6.3f", x / y) } else line = line "     NA"
            }
            rm = (MED[pm[1], f] != "NA" && MED[pm[2], f] != "NA" && MED[pm[2], f] > 0) ? MED[pm[1], f] / MED[pm[2], f] : "NA"
            printf "%-16s %-19s %8s %8s  %s\n", (fi == 1 ? pairs[pi] : ""), what[f], fmt(rm, 3), fmt(median(q, nq), 3), line
        }
    }
    print ""
    print "log rate, recorded boot (whole run: boot, the init'"'"'s short workload, power-off; ftvm log stats):"
    printf "  %-6s %10s %9s %12s %10s %12s  %s\n", "round", "guest s", "records", "bytes", "bytes/s", "Mbit/s", "complete"
    delete a; n = 0
    for (r = 1; r <= rounds; r++) {
        if (GT[r] == "") { printf "  %-6s %10s\n", r, "NA"; continue }
        a[++n] = LR[r]
        printf "  %-6s %10.3f %9s %12s %10.0f %12.4f  %s\n", r, GT[r], LN[r], LB[r], LR[r], LR[r] * 8 / 1e6, LC[r]
    }
    if (n) printf "  %-6s %10s %9s %12s %10.0f %12.4f\n", "median", "", "", "", median(a, n), median(a, n) * 8 / 1e6
    print ""
    printf "log rate, idle (boot, then the shell runs \"sleep %d; poweroff\" typed on the console; one recording):\n", idle
    if (IGT == "") print "  NA (no idle recording stats)"
    else {
        printf "  whole recording:        %8.3f s guest  %10d bytes  %8.0f bytes/s (%.4f Mbit/s)   wall: up %.2f s, off %.2f s, rc=%s\n", IGT, IB, ILR, ILR * 8 / 1e6, IU / 100, IO / 100, IRC
        if (nosplit || IDN == "") print "  idle part: NA (no typed input found in the log)"
        else {
            printf "  up to the typed input:  %8.3f s guest  %10d bytes  %8.0f bytes/s (%.4f Mbit/s)\n", TIN / 1e9, BIN, BIN / (TIN / 1e9), BIN * 8 / (TIN / 1e9) / 1e6
            printf "  idle part (after it):   %8.3f s guest  %10d bytes  %8.0f bytes/s (%.4f Mbit/s), %d records\n", IDN / 1e9, IDB, IDB / (IDN / 1e9), IDB * 8 / (IDN / 1e9) / 1e6, IDR
            if (DB != IB) printf "  (note: record sizes summed from the dump, %d bytes, differ from ftvm log stats, %d)\n", DB, IB
        }
    }
    print ""
    printf "lab session: %d s wall in all (lab boot, warm-up runs, %d rounds, idle recording)\n", elapsed, rounds
    if (bad || nf) { print ""; print "FAILURES:"; for (i = 1; i <= nf; i++) print "  " fails[i] }
}' "$raw"
