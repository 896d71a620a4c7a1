#!/bin/sh
# The part of scripts/bench-net-lab.sh that runs inside the lab (busybox sh,
# a real kvm-amd under QEMU's emulator; see scripts/lab.sh). Not meant to be
# run by hand.
#
# In ONE lab session, ROUNDS times, the order rotated from round to round,
# the Linux guest with its network card and httpd (ftvm.httpd=NET_LINES)
# under each of
#   run     ftvm run (no log)
#   record  ftvm record --log (a file in the lab's RAM)
#   ft      witness + primary + backup on this machine, as tests/lab/net-ft.sh
# Every role's tap joins bridge br0 (169.254.0.1/16, the lab machine is the
# client; the guest is 169.254.0.2). For each, once the httpd serves (under
# FT: once the backup holds the state, so the output rule is in force):
#   ping   PINGS echo requests, PING_I s apart: the round-trip times
#   dl     DL downloads of /data (`seq 1 NET_LINES`) with busybox wget:
#          bytes, time, checksum; the log's growth over each download
#          (record: the log file's size; FT: the primary's log offset, which
#          it prints on stderr once a second, stamped here as it arrives)
#   rps    RPS_SECS seconds of sequential small requests (busybox nc,
#          `GET /data` with `Range: bytes=0-99`: a 206 with 100 bytes, as
#          busybox httpd has no other small file and ignores HEAD)
# and under FT, last, one download with kill -9 of the primary in the
# middle: the client's longest pause (as net-ft.sh measures it).
# Then /cgi-bin/off powers the guest off.
#
# Times from /proc/uptime (10 ms resolution). Output: lines starting with
# RESULT, PINGS, NOTE or FAIL for the host script, nothing else.

# shellcheck disable=SC2086,SC2046,SC2154  # unquoted on purpose ($K is words); now() sets by eval
ROUNDS=${ROUNDS:-3}
N=${NET_LINES:-600000}
DL=${DL:-3}
RPS_SECS=${RPS_SECS:-10}
PINGS=${PINGS:-200}
PING_I=${PING_I:-0.02}
K="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
R="--kernel /g/vmlinux --initrd /g/initrd"
CMDLINE="ftvm.ip=169.254.0.2/16 ftvm.httpd=$N quiet"
IP=169.254.0.2
W=/tmp/nb
mkdir -p $W

# centiseconds since the lab booted, into variable $1 (no fork)
now() {
    read -r _u _ </proc/uptime
    eval "$1=\${_u%.*}\${_u#*.}"
}
note() { echo "NOTE $*"; }
fail() { echo "FAIL $*"; }
. /lib.sh # await
join_bridge() { i=0; while [ ! -e "/sys/class/net/$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done; brctl addif br0 "$1" && ip link set "$1" up; }
size_of() { stat -c %s "$1" 2>/dev/null || echo 0; }
# Stamps each line of stdin with the time it arrived: "<cs> <line>".
stamp() { while IFS= read -r l; do now t; echo "$t $l"; done; }
# The primary's log offset, from the stamped stderr, in the window [$1, $2]
# (centiseconds): "<cs0> <offset0> <cs1> <offset1>" of the first and the
# last "log kept in memory" line inside it, or nothing.
offsets_in() {
    awk -v a="$1" -v b="$2" '/log kept in memory/ && $1 >= a && $1 <= b {
        o = $NF; gsub(/[^0-9]/, "", o); if (!n++) { t0 = $1; o0 = o } t1 = $1; o1 = o }
        END { if (n >= 2) print t0, o0, t1, o1 }' "$3"
}
want=$(seq 1 "$N" | sha256sum | cut -d' ' -f1)
size=$(seq 1 "$N" | wc -c)

# ---- the measurements, once the guest serves; $1 round, $2 mode
measure() {
    r=$1 m=$2
    ping -c 1 -W 20 $IP >/dev/null 2>&1 || note "$m-$r: the first ping went unanswered"
    ping -c "$PINGS" -i "$PING_I" -W 5 $IP >$W/ping.out 2>&1
    echo "PINGS round=$r mode=$m $(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' $W/ping.out | tr '\n' ' ')"
    echo "RESULT kind=ping round=$r mode=$m sent=$PINGS got=$(grep -c 'time=' $W/ping.out)"
    i=1
    while [ $i -le "$DL" ]; do
        rm -f $W/data
        lb0=0; [ "$m" = record ] && lb0=$(size_of $W/rec.ftlog)
        now t0
        timeout 300 wget -q -O $W/data http://$IP/data 2>$W/wget.err
        rc=$?
        now t1
        lb1=0; [ "$m" = record ] && lb1=$(size_of $W/rec.ftlog)
        ok=0; [ "$(sha256sum <$W/data | cut -d' ' -f1)" = "$want" ] && ok=1
        logb=NA logcs=NA
        if [ "$m" = record ]; then logb=$((lb1 - lb0)) logcs=$((t1 - t0)); fi
        if [ "$m" = ft ]; then
            sleep 1.1 # the next offset line, for the last one inside the window
            set -- $(offsets_in "$t0" "$t1" $W/primary.st)
            [ $# = 4 ] && { logb=$(($4 - $2)) logcs=$(($3 - $1)); }
            set -- "$r" "$m"
        fi
        echo "RESULT kind=dl round=$r mode=$m i=$i bytes=$(size_of $W/data) cs=$((t1 - t0)) rc=$rc sha256_ok=$ok log_bytes=$logb log_cs=$logcs"
        [ $rc = 0 ] || { fail "$m-$r download $i: rc=$rc"; sed 's/^/FAIL |  /' $W/wget.err; }
        i=$((i + 1))
    done
    n=0 good=0 bad=0
    now t0
    end=$((t0 + RPS_SECS * 100))
    t=$t0
    while [ "$t" -lt $end ]; do
        printf 'GET /data HTTP/1.0\r\nRange: bytes=0-99\r\n\r\n' | nc -w 10 $IP 80 >$W/rps.out 2>/dev/null
        l=; read -r l <$W/rps.out
        case $l in *" 206 "*) good=$((good + 1)) ;; *) bad=$((bad + 1)) ;; esac
        n=$((n + 1))
        now t
    done
    echo "RESULT kind=rps round=$r mode=$m n=$n ok=$good bad=$bad cs=$((t - t0))"
}

# ---- powers the guest off through its httpd, waits for pid $1 (60 s)
power_off() {
    timeout 60 wget -q -O /dev/null http://$IP/cgi-bin/off 2>/dev/null || note "$1: /cgi-bin/off failed"
    (sleep 60; kill "$2" 2>/dev/null) &
    dog=$!
    wait "$2"
    prc=$?
    kill $dog 2>/dev/null
    wait $dog 2>/dev/null
    return $prc
}

one_plain() { # round mode
    r=$1 m=$2 tap=$2$1
    ip neigh flush dev br0 >/dev/null 2>&1
    rm -f $W/rec.ftlog
    : >$W/$m.out # not the last round's: await must not see its lines
    if [ "$m" = run ]; then
        /bin/ftvm run --no-stdin $K --net tap=$tap --mac 52:54:00:00:00:02 --cmdline "$CMDLINE" >$W/$m.out 2>$W/$m.err &
    else
        /bin/ftvm record --log $W/rec.ftlog --no-stdin $K --net tap=$tap --mac 52:54:00:00:00:02 --cmdline "$CMDLINE" >$W/$m.out 2>$W/$m.err &
    fi
    pid=$!
    now b0
    join_bridge $tap
    if await $W/$m.out FTVM-HTTPD-SERVING; then
        now b1
        echo "RESULT kind=boot round=$r mode=$m cs=$((b1 - b0))"
        measure "$r" "$m"
        power_off "$m-$r" $pid
        rc=$?
    else
        fail "$m-$r: the httpd did not come up"
        tail -n 5 $W/$m.out $W/$m.err | sed 's/^/FAIL |  /'
        kill $pid 2>/dev/null; wait $pid; rc=1
    fi
    echo "RESULT kind=end round=$r mode=$m rc=$rc"
    [ $rc = 0 ] || { fail "$m-$r: ftvm exited $rc"; tail -n 5 $W/$m.err | sed 's/^/FAIL |  /'; }
    grep -h -e ' exits (' -e 'logged .* events' $W/$m.err 2>/dev/null | sed "s/^/NOTE $m-$r summary: /"
    if [ "$m" = record ]; then
        echo "RESULT kind=logfile round=$r bytes=$(size_of $W/rec.ftlog)"
        rm -f $W/rec.ftlog
    fi
}

one_ft() { # round
    r=$1 m=ft
    ip neigh flush dev br0 >/dev/null 2>&1
    w=127.0.0.1:$((7000 + r * 10))
    rm -f $W/primary.st $W/pe $W/backup.st $W/be
    /bin/ftvm keygen --out $W/k >/dev/null 2>&1
    /bin/ftvm witness --listen $w --key $W/k 2>$W/witness.err &
    wit=$!
    sleep 0.5
    # Both roles' stderr stamped as it arrives (the primary's log offset;
    # the backup's takeover, timed from the kill).
    mkfifo $W/pe $W/be
    stamp <$W/be >$W/backup.st &
    bst=$!
    /bin/ftvm backup --witness $w --listen 127.0.0.1:$((7001 + r * 10)) --key $W/k $R --net tap=ftb$r >/dev/null 2>$W/be &
    backup=$!
    join_bridge ftb$r
    stamp <$W/pe >$W/primary.st &
    st=$!
    now b0
    /bin/ftvm primary --witness $w --listen 127.0.0.1:$((7002 + r * 10)) --key $W/k --no-stdin $K --net tap=ftp$r \
        --cmdline "$CMDLINE" >/dev/null 2>$W/pe &
    primary=$!
    join_bridge ftp$r
    : >$W/console.out # not the last round's
    /bin/ftvm console --witness $w --key $W/k --give-up 120 >$W/console.out 2>$W/console.err &
    con=$!
    rc=1
    if await $W/console.out FTVM-HTTPD-SERVING; then
        now b1
        i=0; while ! /bin/ftvm status --witness $w --key $W/k 2>/dev/null | grep -q "holds the state" && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
        now b2
        echo "RESULT kind=boot round=$r mode=$m cs=$((b1 - b0)) backup_cs=$((b2 - b0))"
        if /bin/ftvm status --witness $w --key $W/k 2>&1 | grep -q "holds the state"; then
            measure "$r" ft
            stall "$r" "$w"
            power_off "ft-$r" $backup
            rc=$?
        else
            fail "ft-$r: no backup holds the state: $(/bin/ftvm status --witness $w --key $W/k 2>&1 | tr '\n' ' ')"
            power_off "ft-$r" $primary
        fi
    else
        fail "ft-$r: the httpd did not come up"
        tail -n 5 $W/console.out $W/primary.st $W/backup.st | sed 's/^/FAIL |  /'
    fi
    echo "RESULT kind=end round=$r mode=$m rc=$rc"
    [ $rc = 0 ] || { fail "ft-$r: the last primary exited $rc"; tail -n 8 $W/primary.st $W/backup.st | sed 's/^/FAIL |  /'; }
    grep -h 'logged .* events' $W/primary.st $W/backup.st 2>/dev/null | sed "s/^[0-9]* //; s/^/NOTE ft-$r summary: /"
    for p in $primary $backup $con $wit; do kill -9 $p 2>/dev/null; done
    for p in $primary $backup $con $wit $st $bst; do wait $p 2>/dev/null; done
}

# kill -9 of the primary in the middle of a download: the client's pause
# across the kill (from the file's last growth before the kill to its first
# after it), and its longest pause in that download (as tests/lab/net-ft.sh
# measures it; under FT it need not be the failover's)
stall() { # round witness
    rm -f $W/data
    timeout 300 wget -q -O $W/data http://$IP/data 2>$W/wget.err &
    wget_pid=$!
    ( last=0; now at; echo "$at 0"
      while kill -0 $wget_pid 2>/dev/null; do
          n=$(size_of $W/data); now t
          if [ "$n" != "$last" ]; then echo "$t $n"; last=$n; fi
          sleep 0.02
      done ) >$W/growth &
    mon=$!
    i=0; while [ "$(size_of $W/data)" -lt $((size / 10)) ] && [ $i -lt 3000 ]; do sleep 0.02; i=$((i + 1)); done
    sleep 0.3
    at_kill=$(size_of $W/data)
    /bin/ftvm status --witness "$2" --key $W/k 2>&1 | tr '\n' ' ' | sed "s/^/NOTE ft-$1 status at the kill: /"; echo
    now kt
    kill -9 $primary
    wait $primary 2>/dev/null
    wait $wget_pid
    wrc=$?
    wait $mon
    ok=0; [ "$(sha256sum <$W/data | cut -d' ' -f1)" = "$want" ] && ok=1
    # When the backup saw the kill, was promoted, went live: ms after it.
    awk -v k="$kt" -v r="$1" '$1 >= k && !/log kept in memory/ { $1 = "+" ($1 - k) * 10 " ms:"; print "NOTE ft-" r " backup " $0 }' $W/backup.st | head -n 6
    set -- "$1" $(awk -v k="$kt" 'NR > 1 { g = $1 - p; if (g > lg) lg = g; if (p <= k && $1 > k) { a = p; b = $1 } } { p = $1 }
        END { printf "%d %d %d", (b - a) * 10, (b - k) * 10, lg * 10 }' $W/growth)
    echo "RESULT kind=stall round=$1 stall_ms=$2 resumed_after_kill_ms=$3 longest_pause_ms=$4 killed_at=$at_kill bytes=$(size_of $W/data) rc=$wrc sha256_ok=$ok"
}

[ -c /dev/kvm ] || { fail "no /dev/kvm in the lab"; exit 1; }
note "lab: $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
note "file: $size bytes (seq 1 $N); $DL downloads, ${RPS_SECS}s of requests, $PINGS pings ${PING_I}s apart per mode and round"
ip link set lo up
brctl addbr br0
# Its own address: a bridge without one takes its ports' lowest, which
# changes as the roles' taps come and go (under the guest's ARP cache).
ip link set br0 address 02:00:00:00:00:01
brctl setfd br0 0 2>/dev/null
ip addr add 169.254.0.1/16 dev br0
ip link set br0 up

# BUDGET (seconds since the lab booted, 0: none): no round is started that
# would, at the pace of the longest round so far, end past it.
BUDGET=${BUDGET:-0}
longest=0
r=1
while [ $r -le "$ROUNDS" ]; do
    now r0
    if [ "$BUDGET" -gt 0 ] && [ $((r0 + longest)) -gt $((BUDGET * 100)) ]; then
        note "round $r not started: the lab's time budget (${BUDGET}s) would not hold it"
        break
    fi
    case $((r % 3)) in
        1) order="run record ft" ;;
        2) order="record ft run" ;;
        0) order="ft run record" ;;
    esac
    for m in $order; do
        now s0
        if [ $m = ft ]; then one_ft $r; else one_plain $r $m; fi
        now s1
        note "$m-$r took $(((s1 - s0) / 100)) s"
    done
    now r1
    [ $((r1 - r0)) -gt $longest ] && longest=$((r1 - r0))
    r=$((r + 1))
done
echo "RESULT kind=rounds done=$((r - 1))"
exit 0
