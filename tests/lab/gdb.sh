#!/bin/sh
# Runs inside the lab: gdb (Debian's gdb-minimal, in batch mode) on a
# recording of Linux made here, replayed with `ftvm replay --gdb`. The
# lab's KVM ignores the debug registers, so the breakpoint is a patched
# hlt (vmm/src/gdb/session/patch.rs). $1: the breakpoint's address, in
# the kernel's text (nokaslr: the addresses of vmlinux). Sections as in
# scenarios.sh.
BP=$1
K="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
R="--kernel /g/vmlinux --initrd /g/initrd"
. /lib.sh

/bin/ftvm record --log /tmp/gl.ftlog --no-stdin $K --cmdline "ftvm.poweroff=1 quiet" >/tmp/gdb-record.out 2>/tmp/gdb-record.err
section gdb-record $? /tmp/gdb-record.err

ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
/bin/ftvm replay --log /tmp/gl.ftlog $R --gdb 127.0.0.1:1234 >/tmp/gdb-replay.out 2>/tmp/gdb-replay.err &
P=$!
i=0; while ! grep -q "waiting for gdb" /tmp/gdb-replay.err 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
# remotetimeout: the lab is emulated and the stub probes the KVM before it
# answers gdb's first packets; with gdb's default 2 s a late answer was
# taken for the reply to the next packet (CI, 2026-11-30).
gdb -batch -nx -ex 'set pagination off' -ex 'set confirm off' -ex 'set width 0' \
    -ex 'set remotetimeout 60' -ex 'target remote 127.0.0.1:1234' \
    -ex "break *$BP" \
    -ex 'continue' -ex 'p/x $pc' -ex 'p/x $cs' -ex 'p/x $rsp' -ex "x/2xb $BP" -ex 'monitor when' \
    -ex 'continue' -ex 'p/x $pc' -ex 'p/x $rsp' -ex 'monitor when' \
    -ex 'reverse-continue' -ex 'p/x $pc' -ex 'p/x $rsp' -ex 'monitor when' \
    -ex 'detach' </dev/null >/tmp/gdb.out 2>&1
rc=$?
wait $P
prc=$?
section gdb-session $rc /tmp/gdb.out
section gdb-replay $prc /tmp/gdb-replay.err
exit 0
