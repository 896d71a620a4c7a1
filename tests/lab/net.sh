#!/bin/sh
# Runs inside the lab: the Linux guest with a virtio-net card on a tap
# (ftvm0, made by ftvm; the lab machine is 169.254.0.1, the guest
# 169.254.0.2): it configures eth0, answers ping, serves a file over HTTP;
# the session is recorded and replayed. Sections as in scenarios.sh.
K="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
R="--kernel /g/vmlinux --initrd /g/initrd"
N=${NET_LINES:-200000}
. /lib.sh
# The tap appears once ftvm runs; the lab's side of it gets its address.
tapup() { i=0; while [ ! -e "/sys/class/net/$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done; ip addr add "$2" dev "$1" && ip link set "$1" up; }
ip link set lo up
# Downloads /data: "<bytes> bytes in <ms> ms".
fetch() {
    t0=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    wget -q -O /tmp/data http://169.254.0.2/data
    rc=$?
    t1=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    echo "$(wc -c </tmp/data) bytes in $(((t1 - t0) * 10)) ms"
    return $rc
}

# Plain run first, for the transfer rate without a log (measured, not checked).
/bin/ftvm run --no-stdin $K --net tap=ftvm0 --mac 52:54:00:00:00:02 \
    --cmdline "ftvm.ip=169.254.0.2/16 ftvm.httpd=$N quiet" >/tmp/net-run.out 2>/tmp/net-run.err &
P=$!
tapup ftvm0 169.254.0.1/16
if await /tmp/net-run.out FTVM-HTTPD-SERVING; then
    fetch >/tmp/net-run-http.out 2>&1
    section net-run-http $? /tmp/net-run-http.out
    wget -q -O /dev/null http://169.254.0.2/cgi-bin/off
fi
( sleep 120; kill $P 2>/dev/null ) &
wait $P
section net-run.stderr $? /tmp/net-run.err
# The tap went with the run; ftvm makes it again, the neighbour cache forgets.
ip neigh flush dev ftvm0 2>/dev/null

/bin/ftvm record --log /tmp/net.ftlog --no-stdin $K --net tap=ftvm0 --mac 52:54:00:00:00:02 \
    --cmdline "ftvm.ip=169.254.0.2/16 ftvm.httpd=$N ${NET_QUIET-quiet}" >/tmp/net-record.out 2>/tmp/net-record.err &
P=$!
tapup ftvm0 169.254.0.1/16
if await /tmp/net-record.out FTVM-HTTPD-SERVING; then
    ping -c 3 -W 5 169.254.0.2 >/tmp/net-ping.out 2>&1
    section net-ping $? /tmp/net-ping.out
    took=$(fetch)
    rc=$?
    { echo "got $(wc -c </tmp/data) bytes $(sha256sum </tmp/data | cut -d' ' -f1) in ${took#* in }";
      echo "want $(seq 1 "$N" | wc -c) bytes $(seq 1 "$N" | sha256sum | cut -d' ' -f1)"; } >/tmp/net-http.out
    section net-http $rc /tmp/net-http.out
    wget -q -O /tmp/off.out http://169.254.0.2/cgi-bin/off
    section net-off $? /tmp/off.out
fi
# Powered off by /cgi-bin/off; killed if it never got there.
( sleep 120; kill $P 2>/dev/null ) &
wait $P
rc=$?
section net-record $rc /tmp/net-record.out
section net-record.stderr $rc /tmp/net-record.err
/bin/ftvm replay --log /tmp/net.ftlog $R >/tmp/net-replay.out 2>/tmp/net-replay.err
rc=$?
section net-replay $rc /tmp/net-replay.out
section net-replay.stderr $rc /tmp/net-replay.err
/bin/ftvm log stats /tmp/net.ftlog >/tmp/net-stats.out 2>&1
section net-stats $? /tmp/net-stats.out
exit 0
