#!/bin/sh
# The part of scripts/bench-linux.sh that runs inside the lab (busybox sh, a
# real kvm-amd under QEMU's emulator; see scripts/lab.sh). Not meant to be
# run by hand.
#
# Usage (inside the lab): sh /bench-linux-lab.sh ROUNDS IDLE_SECONDS
#
# Boots the Linux guest (/g/vmlinux, /g/bzImage, /g/initrd) ROUNDS times
# each under `ftvm run`, `ftvm record` and QEMU with KVM, the order rotated
# from round to round, timing each run from its start to
#   up    the console line with FTVM-LINUX-UP (the init reached userspace)
#   off   the kernel's final "reboot: ..." line (the power-off)
#   exit  the process's end (for QEMU on isapc, which has no ACPI and so
#         cannot power off, the halted QEMU is stopped at "off" and exit = off)
# Then one recording that sits idle in the guest's shell for IDLE_SECONDS,
# split with `ftvm log dump` at the typed command's last byte.
#
# Times come from /proc/uptime (busybox date has no %N), read by the shell's
# builtin `read` as each console line arrives: 10 ms resolution, no fork.
# Output: lines starting with RESULT, LOGSTAT, IDLE, NOTE or FAIL for the
# host script to parse, nothing else on success.

# shellcheck disable=SC2086,SC2154  # unquoted on purpose ($G is words); now() sets by eval
ROUNDS=${1:-3}
IDLE=${2:-10}
LIMIT=${BENCH_RUN_LIMIT:-120} # seconds one boot may take before it is killed

G="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
APPEND="console=ttyS0 noapic nolapic nokaslr lpj=2000000 tsc=unstable pci=off reboot=k panic=-1 i8042.noaux ftvm.poweroff=1 quiet"
QMACHINE=isapc,kernel-irqchip=off
QEXTRA=
W=/tmp/bench
mkdir -p $W

# centiseconds since the lab booted, into variable $1
now() {
    read -r _u _ </proc/uptime
    eval "$1=\${_u%.*}\${_u#*.}"
}

fail() { echo "FAIL $*"; }

# show NAME: the tails of a run's output and stderr, for a failure report
show() {
    echo "FAIL --- $1 console (last lines):"
    tail -n 15 $W/$1.out 2>/dev/null | sed 's/^/FAIL |  /'
    echo "FAIL --- $1 stderr (last lines):"
    tail -n 15 $W/$1.err 2>/dev/null | sed 's/^/FAIL |  /'
}

# timed NAME CMD...: starts CMD with its stdout into a fifo (stdin from
# $STDIN, default /dev/null) and reads that fifo line by line, stamping the
# sentinel and the power-off line. Sets T_UP, T_OFF, T_EXIT (centiseconds
# from the start, or NA) and RC. If $TYPE is set, the first time the
# guest's "shell on the console" line shows up, waits 2 s and writes $TYPE
# to fd 3 (the caller holds the writing end of $STDIN open as fd 3).
timed() {
    name=$1; shift
    rm -f $W/$name.fifo; mkfifo $W/$name.fifo
    : >$W/$name.out
    now t0
    "$@" <"${STDIN:-/dev/null}" >$W/$name.fifo 2>$W/$name.err &
    pid=$!
    (sleep $LIMIT; kill $pid 2>/dev/null) &
    dog=$!
    up=; off=; typed=; killed=
    while IFS= read -r line; do
        case $line in
            *FTVM-LINUX-UP*) [ -n "$up" ] || now up ;;
            *"reboot: "*)
                if [ -z "$off" ]; then
                    now off
                    # a halted machine (no ACPI) never leaves by itself
                    case $line in *"System halted"*) [ "$KILL_ON_HALT" = 1 ] && { kill $pid 2>/dev/null; killed=1; } ;; esac
                fi ;;
            *"shell on the console"*)
                if [ -n "$TYPE" ] && [ -z "$typed" ]; then
                    typed=1
                    (sleep 2; printf '%s\n' "$TYPE" >&3) &
                fi ;;
        esac
        printf '%s\n' "$line" >>$W/$name.out
    done <$W/$name.fifo
    wait $pid
    RC=$?
    now t1
    kill $dog 2>/dev/null
    wait $dog 2>/dev/null
    [ -n "$killed" ] && RC=0
    T_UP=NA; T_OFF=NA; T_EXIT=$((t1 - t0))
    [ -n "$up" ] && T_UP=$((up - t0))
    [ -n "$off" ] && T_OFF=$((off - t0))
    [ -n "$killed" ] && T_EXIT=$T_OFF
    rm -f $W/$name.fifo
}

qemu_cmd() {
    # shellcheck disable=SC2086
    exec qemu-system-x86_64 -accel kvm -M $QMACHINE -cpu qemu64,-apic,-x2apic,-tsc,-rdtscp -m 256 \
        -nographic -no-reboot $QEXTRA -kernel /g/bzImage -initrd /g/initrd -append "$APPEND"
}

one() { # MODE ROUND
    mode=$1 r=$2 name=$1-$2
    KILL_ON_HALT=0
    case $mode in
        run) timed $name /bin/ftvm run --no-stdin $G --cmdline "ftvm.poweroff=1 quiet" ;;
        record) timed $name /bin/ftvm record --no-stdin --log $W/$name.ftlog $G --cmdline "ftvm.poweroff=1 quiet" ;;
        qemu) KILL_ON_HALT=1; timed $name qemu_cmd ;;
    esac
    echo "RESULT round=$r mode=$mode up=$T_UP off=$T_OFF exit=$T_EXIT rc=$RC killed_at_halt=${killed:-0}"
    if [ "$RC" != 0 ] || [ "$T_UP" = NA ] || [ "$T_OFF" = NA ]; then
        fail "$name: rc=$RC up=$T_UP off=$T_OFF"
        show $name
    fi
    if [ $mode = record ] && [ -s $W/$name.ftlog ]; then
        /bin/ftvm log stats $W/$name.ftlog 2>&1 | while IFS= read -r l; do
            case $l in
                "records: "*|"guest time: "*|"complete: "*) echo "LOGSTAT round=$r $l" ;;
            esac
        done
        echo "LOGSTAT round=$r file: $(wc -c <$W/$name.ftlog) bytes"
        rm -f $W/$name.ftlog
    fi
}

# QEMU's machine: isapc as asked; if it cannot boot the guest, the default pc.
probe_qemu() {
    KILL_ON_HALT=1; timed qemu-probe qemu_cmd
    if [ "$T_UP" = NA ] || [ "$RC" != 0 ]; then
        echo "NOTE qemu -M $QMACHINE did not boot the guest (rc=$RC); its output:"
        tail -n 8 $W/qemu-probe.out | sed 's/^/NOTE |  /'
        tail -n 8 $W/qemu-probe.err | sed 's/^/NOTE |  /'
        QMACHINE=pc,kernel-irqchip=off
        QEXTRA="-nic none"
        echo "NOTE falling back to qemu -M $QMACHINE $QEXTRA"
    fi
    echo "NOTE qemu machine: -M $QMACHINE${QEXTRA:+ $QEXTRA} (probe: up=$T_UP off=$T_OFF, not counted)"
}

[ -c /dev/kvm ] || { fail "no /dev/kvm in the lab"; exit 1; }
echo "NOTE lab: $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"

# warm-up: first touch of every binary and image (page cache is RAM here,
# but the first exec still pays for faulting the files in), not counted
probe_qemu
KILL_ON_HALT=0
timed warmup /bin/ftvm run --no-stdin $G --cmdline "ftvm.poweroff=1 quiet"
echo "NOTE warm-up ftvm run: up=$T_UP off=$T_OFF exit=$T_EXIT rc=$RC (not counted)"

r=1
while [ $r -le $ROUNDS ]; do
    case $((r % 3)) in
        1) order="run record qemu" ;;
        2) order="record qemu run" ;;
        0) order="qemu run record" ;;
    esac
    for m in $order; do one $m $r; done
    r=$((r + 1))
done

# ---- idle: boot to the shell, type "sleep IDLE; poweroff", record it all
rm -f $W/in.fifo; mkfifo $W/in.fifo
# fd 3 holds the fifo open (read-write, so opening it does not block): the
# guest's stdin stays open until the end, and the typed line goes there
exec 3<>$W/in.fifo
STDIN=$W/in.fifo TYPE="sleep $IDLE; poweroff" KILL_ON_HALT=0
timed idle /bin/ftvm record --log $W/idle.ftlog $G --cmdline quiet
STDIN='' TYPE=''
exec 3>&-
echo "RESULT round=idle mode=record up=$T_UP off=$T_OFF exit=$T_EXIT rc=$RC"
if [ "$RC" != 0 ] || [ "$T_OFF" = NA ]; then
    fail "idle: rc=$RC off=$T_OFF"
    show idle
fi
if [ -s $W/idle.ftlog ]; then
    /bin/ftvm log stats $W/idle.ftlog 2>&1 | while IFS= read -r l; do
        case $l in
            "records: "*|"guest time: "*|"complete: "*) echo "IDLE stats $l" ;;
        esac
    done
    # Record sizes as replay-log/src/codec.rs encodes them: 8 bytes of frame
    # + 26 of fixed body + the payload (8 for time/wallclock/value/check, 1
    # for interrupt, 18 for end, the bytes for serial-in). The idle part
    # starts at the first time record after the last serial-in record.
    /bin/ftvm log dump $W/idle.ftlog | awk '
        /^#[0-9]+ @/ {
            k = $5; sz = 34
            if (k == "time" || k == "wallclock" || k == "value" || k == "check") sz += 8
            else if (k == "interrupt") sz += 1
            else if (k == "end") sz += 18
            else if (k == "serial-in") {
                s = $0; i = index(s, "serial-in \""); s = substr(s, i + 11); s = substr(s, 1, length(s) - 1)
                gsub(/\\x[0-9a-fA-F][0-9a-fA-F]/, "X", s); gsub(/\\./, "X", s)
                sz += length(s); nin++
            }
            total += sz; n++
            if (k == "time") {
                split($6, a, "="); t = a[2] + 0
                if (t > maxt) maxt = t
                if (waitt) { tstart = t; waitt = 0; bstart = total - sz; nstart = n - 1 }
            }
            if (k == "serial-in") { waitt = 1; if (!first_in) { first_in = 1; tin = maxt; bin = total - sz } }
        }
        END {
            printf "IDLE dump records=%.0f bytes=%.0f serial_in=%.0f guest_ns=%.0f\n", n, total, nin, maxt
            if (nin && !waitt)
                printf "IDLE split before_input_ns=%.0f before_input_bytes=%.0f idle_start_ns=%.0f idle_bytes=%.0f idle_records=%.0f idle_ns=%.0f\n", tin, bin, tstart, total - bstart, n - nstart, maxt - tstart
            else
                print "IDLE split none (no serial-in record, or no time record after it)"
        }'
    rm -f $W/idle.ftlog
fi
exit 0
