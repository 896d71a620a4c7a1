#!/usr/bin/env bash
# Measures the network card in the lab (scripts/lab.sh: a real kvm-amd inside
# QEMU's TCG emulator), plain vs recorded vs fault-tolerant, in ONE lab
# session (tests/lab/net-bench.sh): R rounds, the order rotated each round,
# of the Linux guest serving /data (`seq 1 NET_LINES`) with busybox httpd
# under `ftvm run`, `ftvm record` and FT (witness + primary + backup on the
# lab machine, each role's tap on one bridge), the lab machine the client:
#   transfer rate   DL downloads of /data (busybox wget), bytes/s
#   requests/s      S seconds of sequential small requests (busybox nc,
#                   a 100-byte Range of /data; a new connection each)
#   round trip      ping times, p50/p99 (FT - plain: what the output rule adds)
#   log bandwidth   during the downloads: the record log file's growth, the
#                   FT primary's log offset (its stderr, once a second)
#   failover stall  FT: the client's pause across a kill -9 of the primary
#                   in the middle of a download (and its longest pause in
#                   that download), once per round
# Prints a table: medians, every round, record/plain and FT/plain ratios.
# The lab is nested and emulated (one vCPU for guest, ftvm roles and client
# alike): absolute figures are far below real hardware.
#
# Usage: scripts/bench-net-lab.sh [-n ROUNDS] [-l NET_LINES] [-d DOWNLOADS]
#                                 [-s RPS_SECONDS] [-p PINGS] [-t LAB_TIMEOUT]
#   -n R  rounds (default 3)
#   -l N  the file is `seq 1 N` (default 600000: 4.6 MB)
#   -d D  downloads per mode and round (default 3)
#   -s S  seconds of small requests per mode and round (default 10)
#   -p P  pings per mode and round, 20 ms apart (default 200)
#   -t T  hard limit for the whole lab session, seconds (default 1500)
# Environment: FTVM=path uses that binary instead of building
# target/release/ftvm. Keeps the lab's raw output in build/bench-net-lab.out.
# Exits non-zero if the lab failed, a download or request failed, or a
# connection was reset.
set -euo pipefail

BENCH_NAME=bench-net-lab BENCH_USAGE=2,32
# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"
rounds=3 lines=600000 downloads=3 secs=10 pings=200 timeout=1500
bench_int_options "n:rounds l:lines d:downloads s:secs p:pings t:timeout" "$@"
ROOT=$BENCH_ROOT
bench_ftvm

OUT=$ROOT/guest/linux/out
if [ ! -s "$OUT/vmlinux" ] || [ ! -s "$OUT/initramfs.cpio.gz" ]; then
    echo "bench-net-lab: building the Linux guest (scripts/linux-guest.sh)" >&2
    scripts/linux-guest.sh >&2
fi

mkdir -p build
raw=$ROOT/build/bench-net-lab.out
echo "bench-net-lab: one lab session: $rounds rounds of ftvm run / ftvm record / FT, file seq 1 $lines, $downloads downloads, ${secs}s of requests, $pings pings each (lab timeout ${timeout}s)" >&2
start=$(date +%s)
set +e
scripts/lab.sh --timeout "$timeout" --ftvm "$ftvm" \
    --file "$OUT/vmlinux:/g/vmlinux" \
    --file "$OUT/initramfs.cpio.gz:/g/initrd" \
    --file "$ROOT/tests/lab/net-bench.sh:/net-bench.sh" --file "$ROOT/tests/lab/lib.sh:/lib.sh" \
    -- env BUDGET=$((timeout - 240)) ROUNDS="$rounds" NET_LINES="$lines" DL="$downloads" RPS_SECS="$secs" PINGS="$pings" sh /net-bench.sh \
    | tee "$raw" | sed -u 's/^/lab| /' >&2
rcs=("${PIPESTATUS[@]}")
set -e
elapsed=$(($(date +%s) - start))
if [ "${rcs[0]}" != 0 ]; then
    echo "bench-net-lab: the lab failed (status ${rcs[0]}); raw output in $raw" >&2
    exit 1
fi

kver=$(sed -n 's/^ *\(linux-image[^ ]*\) .*/\1/p' "$OUT/VERSION" 2>/dev/null | head -1)
kver=${kver:-$(head -1 "$OUT/VERSION" 2>/dev/null)}

set +e
awk -v rounds="$rounds" -v elapsed="$elapsed" -v kver="$kver" '
function sortv(a, n,    i, j, t) { for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t } }
function median(a, n,    b, i) { if (n == 0) return "NA"; for (i = 1; i <= n; i++) b[i] = a[i]; sortv(b, n); return (n % 2) ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2 }
# nearest-rank percentile of a sorted array
function pct(a, n, p,    k) { if (n == 0) return "NA"; k = int(p * n + 0.999999); if (k < 1) k = 1; if (k > n) k = n; return a[k] }
function kv(s, key,    i, n, p) { n = split(s, p, " "); for (i = 1; i <= n; i++) if (index(p[i], key "=") == 1) return substr(p[i], length(key) + 2); return "" }
function fmt(x, p) { return (x == "NA" || x == "") ? "NA" : sprintf("%." p "f", x) }
function ratio(x, y) { return (x == "NA" || y == "NA" || x == "" || y == "" || y == 0) ? "NA" : x / y }
/^NOTE / { notes[++nn] = substr($0, 6); next }
/^FAIL / { fails[++nf] = substr($0, 6); next }
/^PINGS / {
    m = kv($0, "mode"); r = kv($0, "round")
    n = split($0, w, " ")
    for (i = 4; i <= n; i++) { P[m, ++PN[m]] = w[i] + 0; PR[m, r, ++PRN[m, r]] = w[i] + 0 }
    next
}
/^RESULT / {
    k = kv($0, "kind"); m = kv($0, "mode"); r = kv($0, "round")
    if (k == "dl") {
        b = kv($0, "bytes"); cs = kv($0, "cs")
        DB[m, r] += b; DC[m, r] += cs
        if (kv($0, "rc") != 0 || kv($0, "sha256_ok") != 1) { dlbad++; resets[m]++ }
        ndl[m]++
        lb = kv($0, "log_bytes"); lc = kv($0, "log_cs")
        if (lb != "NA" && lc != "NA" && lc > 0) { LB[m, r] += lb; LC[m, r] += lc }
    } else if (k == "rps") {
        RN[m, r] = kv($0, "ok"); RC[m, r] = kv($0, "cs"); RB[m] += kv($0, "bad")
        if (kv($0, "bad") > 0) rpsbad++
    } else if (k == "ping") {
        PS[m] += kv($0, "sent"); PG[m] += kv($0, "got")
    } else if (k == "boot") {
        BT[m, r] = kv($0, "cs"); if (m == "ft") BK[r] = kv($0, "backup_cs")
    } else if (k == "stall") {
        ST[++ns] = kv($0, "stall_ms"); SL[ns] = kv($0, "longest_pause_ms"); SR[ns] = kv($0, "resumed_after_kill_ms"); SOK[ns] = (kv($0, "rc") == 0 && kv($0, "sha256_ok") == 1)
        if (!SOK[ns]) stallbad++
    } else if (k == "end") {
        if (kv($0, "rc") != 0) endbad++
        ended[m]++
    } else if (k == "rounds") {
        done = kv($0, "done")
    } else if (k == "logfile") {
        LF[r] = kv($0, "bytes")
    }
    next
}
END {
    split("run record ft", modes, " ")
    name["run"] = "plain (run)"; name["record"] = "record"; name["ft"] = "FT"
    print ""
    print "=== ftvm: the network card in the lab, plain vs record vs FT ==="
    printf "guest: %s, 256 MiB, busybox httpd; %d rounds, order rotated each round; the lab machine is the client\n", kver, rounds
    for (i = 1; i <= nn; i++) print "  " notes[i]
    print ""
    print "CAVEAT: lab: kvm-amd 6.1 nested in QEMU TCG on a shared 2-core host, one vCPU for the guest, every"
    print "ftvm role and the client; absolute numbers are far below real hardware. Ratios are what count."
    print ""
    # per mode, per round values
    for (mi = 1; mi <= 3; mi++) {
        m = modes[mi]; nt = 0; nr = 0; nl = 0
        for (r = 1; r <= rounds; r++) {
            T[m, r] = (DC[m, r] > 0) ? DB[m, r] / (DC[m, r] / 100) : "NA"
            if (T[m, r] != "NA") tv[m, ++nt] = T[m, r]
            Q[m, r] = (RC[m, r] > 0) ? RN[m, r] / (RC[m, r] / 100) : "NA"
            if (Q[m, r] != "NA") qv[m, ++nr] = Q[m, r]
            L[m, r] = (LC[m, r] > 0) ? LB[m, r] * 8 / (LC[m, r] / 100) / 1e6 : "NA"
            if (L[m, r] != "NA") lv[m, ++nl] = L[m, r]
        }
        delete a; for (i = 1; i <= nt; i++) a[i] = tv[m, i]; MT[m] = median(a, nt)
        delete a; for (i = 1; i <= nr; i++) a[i] = qv[m, i]; MQ[m] = median(a, nr)
        delete a; for (i = 1; i <= nl; i++) a[i] = lv[m, i]; ML[m] = median(a, nl)
        delete a; for (i = 1; i <= PN[m]; i++) a[i] = P[m, i]; sortv(a, PN[m])
        P50[m] = pct(a, PN[m], 0.5); P99[m] = pct(a, PN[m], 0.99); PMAX[m] = PN[m] ? a[PN[m]] : "NA"
        for (r = 1; r <= rounds; r++) {
            delete a; for (i = 1; i <= PRN[m, r]; i++) a[i] = PR[m, r, i]; sortv(a, PRN[m, r])
            RP50[m, r] = pct(a, PRN[m, r], 0.5); RP99[m, r] = pct(a, PRN[m, r], 0.99)
        }
    }
    line = ""; for (r = 1; r <= rounds; r++) line = line sprintf(" %9s", "round " r)
    printf "%-28s %-13s %9s %s\n", "", "", "median", line
    split("transfer (MB/s):requests/s:ping p50 (ms):ping p99 (ms):log (Mbit/s)", what, ":")
    for (wi = 1; wi <= 5; wi++) for (mi = 1; mi <= 3; mi++) {
        m = modes[mi]; line = ""
        for (r = 1; r <= rounds; r++) {
            if (wi == 1) v = (T[m, r] == "NA") ? "NA" : T[m, r] / 1e6
            else if (wi == 2) v = Q[m, r]
            else if (wi == 3) v = RP50[m, r]
            else if (wi == 4) v = RP99[m, r]
            else v = L[m, r]
            line = line sprintf(" %9s", fmt(v, (wi == 2 || wi == 5) ? 2 : 3))
        }
        if (wi == 1) v = (MT[m] == "NA") ? "NA" : MT[m] / 1e6
        else if (wi == 2) v = MQ[m]
        else if (wi == 3) v = P50[m]
        else if (wi == 4) v = P99[m]
        else v = ML[m]
        if (wi == 5 && m == "run") continue
        printf "%-28s %-13s %9s %s\n", (mi == 1 || (wi == 5 && mi == 2) ? what[wi] : ""), name[m], fmt(v, (wi == 2 || wi == 5) ? 2 : 3), line
    }
    print "  (ping: p50/p99 in the median column are over all rounds pooled; per round in the others)"
    print ""
    printf "%-28s %9s %9s %s\n", "ratio", "of med.", "med.", " per round"
    split("record/run ft/run", pairs, " ")
    for (pi = 1; pi <= 2; pi++) {
        split(pairs[pi], pm, "/")
        for (wi = 1; wi <= 2; wi++) {
            delete q; nq = 0; line = ""
            for (r = 1; r <= rounds; r++) {
                x = (wi == 1) ? T[pm[1], r] : Q[pm[1], r]; y = (wi == 1) ? T[pm[2], r] : Q[pm[2], r]
                v = ratio(x, y); if (v != "NA") q[++nq] = v
                line = line sprintf(" %9s", fmt(v, 3))
            }
            v = (wi == 1) ? ratio(MT[pm[1]], MT[pm[2]]) : ratio(MQ[pm[1]], MQ[pm[2]])
            printf "%-28s %9s %9s %s\n", pm[1] "/plain " (wi == 1 ? "transfer" : "requests/s"), fmt(v, 3), fmt(median(q, nq), 3), line
        }
    }
    print ""
    printf "round trip added by FT (FT - plain, pooled): p50 %s ms, p99 %s ms; record - plain: p50 %s ms, p99 %s ms\n", \
        fmt(P50["ft"] - P50["run"], 3), fmt(P99["ft"] - P99["run"], 3), fmt(P50["record"] - P50["run"], 3), fmt(P99["record"] - P99["run"], 3)
    printf "pings answered: plain %d/%d, record %d/%d, FT %d/%d; max: plain %s, record %s, FT %s ms\n", \
        PG["run"], PS["run"], PG["record"], PS["record"], PG["ft"], PS["ft"], PMAX["run"], PMAX["record"], PMAX["ft"]
    printf "log bandwidth under load (during the downloads): record %s Mbit/s, FT %s Mbit/s (median of rounds); VMware FT reports 1.5-18 Mbit/s\n", fmt(ML["record"], 2), fmt(ML["ft"], 2)
    line = ""; for (i = 1; i <= ns; i++) line = line sprintf(" %s%s", ST[i], SOK[i] ? "" : "(failed)")
    line2 = ""; for (i = 1; i <= ns; i++) line2 = line2 sprintf(" %s/%s", (SR[i] == "" ? "NA" : SR[i]), (SL[i] == "" ? "NA" : SL[i]))
    delete a; for (i = 1; i <= ns; i++) a[i] = ST[i]
    printf "failover stall seen by the client (ms), kill -9 of the primary mid-download: the pause across the kill:%s (median %s)\n", (ns ? line : " NA"), fmt(median(a, ns), 0)
    printf "  data again after the kill / the longest pause in that download (ms):%s\n", (ns ? line2 : " NA")
    line = ""; for (r = 1; r <= rounds; r++) line = line sprintf(" %s/%s/%s", fmt(BT["run", r] / 100, 1), fmt(BT["record", r] / 100, 1), fmt(BT["ft", r] / 100, 1))
    printf "to FTVM-HTTPD-SERVING (s, plain/record/FT per round):%s\n", line
    printf "downloads: plain %d, record %d, FT %d; failed or corrupt: %d; small requests failed: plain %d, record %d, FT %d\n", \
        ndl["run"], ndl["record"], ndl["ft"], dlbad, RB["run"], RB["record"], RB["ft"]
    printf "lab session: %d s wall in all; %d of %d rounds done\n", elapsed, done, rounds
    if (nf) { print ""; print "FAILURES:"; for (i = 1; i <= nf; i++) print "  " fails[i] }
    S = sprintf("bench-net-lab: transfer FT/plain %s, record/plain %s; requests/s FT/plain %s; ping +%s/+%s ms (p50/p99, FT - plain); log %s Mbit/s (FT), %s (record); stall %s ms; failures %d", \
        fmt(ratio(MT["ft"], MT["run"]), 3), fmt(ratio(MT["record"], MT["run"]), 3), fmt(ratio(MQ["ft"], MQ["run"]), 3), \
        fmt(P50["ft"] - P50["run"], 2), fmt(P99["ft"] - P99["run"], 2), fmt(ML["ft"], 2), fmt(ML["record"], 2), fmt(median(a, ns), 0), dlbad + rpsbad + stallbad + endbad + nf)
    print S > "/dev/stderr"
    exit (dlbad + rpsbad + stallbad + endbad + nf > 0 || done < 1 || ended["run"] + ended["record"] + ended["ft"] < 3 * done) ? 1 : 0
}' "$raw"
rc=$?
set -e
exit $rc
