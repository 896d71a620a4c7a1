#!/bin/sh
# Runs inside the lab: the Linux guest with a network card under fault
# tolerance. The lab machine is 169.254.0.1 on bridge br0; the primary's
# and each backup's taps join it. ROUNDS times: the lab machine downloads
# a file from the guest's httpd and the primary is killed (kill -9) in the
# middle of the download; the backup takes over, a new backup joins for the
# next round; then the backup is killed during a download
# ("net-ft-backup-killed"). Each round prints a section "net-ft-round-I" with
#   net_failover stall_ms=<longest pause the client saw> bytes=<downloaded> sha256_ok=<1|0> resets=<connections reset>
# Then /cgi-bin/off powers the guest off.
K="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
R="--kernel /g/vmlinux --initrd /g/initrd"
ROUNDS=${ROUNDS:-5}
N=${NET_LINES:-300000}
W=127.0.0.1:7000
. /lib.sh
# A role's tap appears once it runs; it joins the bridge.
join_bridge() { i=0; while [ ! -e "/sys/class/net/$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done; brctl addif br0 "$1" && ip link set "$1" up; }
# Everything the roles said, as the last section; then stop.
finish() {
    cat /tmp/primary.err /tmp/backup*.err /tmp/witness.err /tmp/console.err 2>/dev/null | grep -v "log kept in memory" >/tmp/all.err
    section net-ft.stderr 0 /tmp/all.err
    exit 0
}
fail() { echo "$*" >/tmp/fail.out; section net-ft-failed 1 /tmp/fail.out; finish; }

ip link set lo up
brctl addbr br0
# Its own address: a bridge without one takes its ports' lowest, which
# changes as the roles' taps come and go (under the guest's ARP cache).
ip link set br0 address 02:00:00:00:00:01
ip addr add 169.254.0.1/16 dev br0
ip link set br0 up
/bin/ftvm keygen --out /tmp/k
/bin/ftvm witness --listen $W --key /tmp/k 2>/tmp/witness.err &
sleep 0.5
/bin/ftvm backup --witness $W --listen 127.0.0.1:7101 --key /tmp/k $R --net tap=ftvm-b1 >/dev/null 2>/tmp/backup1.err &
backup=$!
join_bridge ftvm-b1
/bin/ftvm primary --witness $W --listen 127.0.0.1:7100 --key /tmp/k --no-stdin $K --net tap=ftvm-p \
    --cmdline "ftvm.ip=169.254.0.2/16 ftvm.httpd=$N quiet" >/dev/null 2>/tmp/primary.err &
primary=$!
join_bridge ftvm-p
/bin/ftvm console --witness $W --key /tmp/k --give-up 120 >/tmp/console.out 2>/tmp/console.err &
await /tmp/console.out FTVM-HTTPD-SERVING || fail "the guest's httpd did not come up: $(tail -3 /tmp/console.out)"
want=$(seq 1 "$N" | sha256sum | cut -d' ' -f1)
size=$(seq 1 "$N" | wc -c)

r=1
while [ $r -le "$ROUNDS" ]; do
    # The backup must hold the state before its primary dies.
    i=0; while ! /bin/ftvm status --witness $W --key /tmp/k 2>/dev/null | grep -q "holds the state" && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
    # ... and have caught up: a backup fresh from its snapshot acknowledges
    # only as fast as it replays what came since, and output waits for it
    # (here, on one emulated CPU, tens of seconds; not the failover's pause).
    until=$(($(cs) + 12000))
    while [ "$(/bin/ftvm status --witness $W --key /tmp/k 2>/dev/null | sed -n 's/.*(lag \([0-9]*\) exits).*/\1/p')" -gt 2000 ] 2>/dev/null && [ "$(cs)" -lt $until ]; do sleep 0.2; done
    kill -0 $primary 2>/dev/null || fail "round $r: the primary is gone before the kill"
    /bin/ftvm status --witness $W --key /tmp/k 2>&1 | grep -q "holds the state" || fail "round $r: no backup holds the state: $(/bin/ftvm status --witness $W --key /tmp/k 2>&1)"
    # The guest answers before the download starts (and the lab machine
    # knows its MAC); a round where it does not says what it saw.
    if ! ping -c 1 -W 20 169.254.0.2 >/tmp/ping.out 2>&1; then
        { cat /tmp/ping.out; /bin/ftvm status --witness $W --key /tmp/k; ip neigh; brctl showmacs br0; } >/tmp/noping.out 2>&1
        section "net-ft-noping-$r" 1 /tmp/noping.out
    fi
    rm -f /tmp/data
    timeout 300 wget -q -O /tmp/data http://169.254.0.2/data 2>/tmp/wget.err &
    wget_pid=$!
    # The client's longest pause: the longest time the file did not grow.
    # A timeline for a long pause: every ~0.5 s the copy's size and the
    # packet counters of the backup's tap (tx: to ftvm, rx: from it) and of
    # br0 (the client's side).
    tap=ftvm-b$r
    ( last=0; at=$(cs); longest=0; k=0
      while kill -0 $wget_pid 2>/dev/null; do
          n=$(stat -c %s /tmp/data 2>/dev/null || echo 0); now=$(cs)
          if [ "$n" != "$last" ]; then gap=$((now - at)); [ $gap -gt $longest ] && longest=$gap; last=$n; at=$now; fi
          k=$((k + 1))
          if [ $((k % 25)) -eq 0 ]; then
              echo "$now size=$n tap:tx=$(cat /sys/class/net/$tap/statistics/tx_packets 2>/dev/null) rx=$(cat /sys/class/net/$tap/statistics/rx_packets 2>/dev/null) br0:tx=$(cat /sys/class/net/br0/statistics/tx_packets) rx=$(cat /sys/class/net/br0/statistics/rx_packets) tcp:$(awk '/^Tcp:/ {getline; print "in=" $11 " out=" $12 " retrans=" $13}' /proc/net/snmp)"
          fi
          sleep 0.02
      done
      echo $((longest * 10)) >/tmp/stall ) >/tmp/timeline &
    mon=$!
    # Kill in the middle: once a tenth has arrived, and a little later
    # each round.
    i=0; while [ "$(stat -c %s /tmp/data 2>/dev/null || echo 0)" -lt $((size / 10)) ] && [ $i -lt 3000 ]; do sleep 0.02; i=$((i + 1)); done
    sleep "0.$((r * 17 % 10))"
    got_at_kill=$(stat -c %s /tmp/data 2>/dev/null || echo 0)
    echo "$(cs) KILL" >>/tmp/timeline
    kill -9 $primary
    primary=$backup
    wait $wget_pid
    wrc=$?
    wait $mon
    got=$(sha256sum </tmp/data | cut -d' ' -f1)
    bytes=$(wc -c </tmp/data)
    ok=0; [ "$got" = "$want" ] && ok=1
    resets=0; [ $wrc -ne 0 ] && resets=1
    { echo "killed the primary at $got_at_kill of $size bytes"; cat /tmp/wget.err
      echo "net_failover stall_ms=$(cat /tmp/stall) bytes=$bytes sha256_ok=$ok resets=$resets"; } >/tmp/round.out
    section "net-ft-round-$r" $wrc /tmp/round.out
    if [ "$(cat /tmp/stall)" -gt 5000 ]; then
        { echo "killed at $(cs) (now); timeline:"; cat /tmp/timeline; echo "neighbours:"; ip neigh; echo "bridge:"; brctl showmacs br0; } >/tmp/tl.out 2>&1
        section "net-ft-stall-$r" 0 /tmp/tl.out
    fi
    r=$((r + 1))
    if [ $r -le "$ROUNDS" ]; then
        /bin/ftvm backup --witness $W --listen 127.0.0.1:$((7100 + r)) --key /tmp/k $R --net tap=ftvm-b$r >/dev/null 2>/tmp/backup$r.err &
        backup=$!
        join_bridge ftvm-b$r
    fi
done
# The backup killed during a download: the primary stops holding frames
# for it (a new view) and the download goes on.
/bin/ftvm backup --witness $W --listen 127.0.0.1:7199 --key /tmp/k $R --net tap=ftvm-bk >/dev/null 2>/tmp/backupk.err &
backup=$!
join_bridge ftvm-bk
i=0; while ! /bin/ftvm status --witness $W --key /tmp/k 2>/dev/null | grep -q "holds the state" && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
rm -f /tmp/data
t0=$(cs)
timeout 300 wget -q -O /tmp/data http://169.254.0.2/data 2>/tmp/wget.err &
wget_pid=$!
i=0; while [ "$(stat -c %s /tmp/data 2>/dev/null || echo 0)" -lt $((size / 10)) ] && [ $i -lt 3000 ]; do sleep 0.02; i=$((i + 1)); done
kill -9 $backup
wait $wget_pid
wrc=$?
t1=$(cs)
{ cat /tmp/wget.err; echo "backup killed; downloaded $(wc -c </tmp/data) bytes in $(((t1 - t0) * 10)) ms, sha256_ok=$([ "$(sha256sum </tmp/data | cut -d' ' -f1)" = "$want" ] && echo 1 || echo 0)";
  /bin/ftvm status --witness $W --key /tmp/k; } >/tmp/bk.out 2>&1
section net-ft-backup-killed $wrc /tmp/bk.out

timeout 60 wget -q -O /tmp/off.out http://169.254.0.2/cgi-bin/off
section net-ft-off $? /tmp/off.out
( sleep 60; kill $primary 2>/dev/null ) &
wait $primary
section net-ft-console 0 /tmp/console.out
finish
