#!/bin/sh
# Runs inside the lab (a real kvm-amd under QEMU's emulator): the Linux guest
# and the test guest under ftvm, recorded and replayed. Each scenario's
# output goes between "=== NAME rc=N ===" and "=== end NAME ===" lines for
# tests/lab.rs to check.
K="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
R="--kernel /g/vmlinux --initrd /g/initrd"
section() { # name rc file
    echo "=== $1 rc=$2 ==="
    cat "$3"
    echo "=== end $1 ==="
}
run() { # name, command...
    name=$1; shift
    "$@" >/tmp/$name.out 2>/tmp/$name.err
    rc=$?
    section "$name" $rc /tmp/$name.out
    section "$name.stderr" $rc /tmp/$name.err
}

run linux-run /bin/ftvm run --no-stdin $K --cmdline "ftvm.poweroff=1 quiet"
for n in 1 2; do
    run linux-record-$n /bin/ftvm record --log /tmp/l$n.ftlog --no-stdin $K --cmdline "ftvm.poweroff=1 quiet"
    run linux-replay-$n /bin/ftvm replay --log /tmp/l$n.ftlog $R
done
run linux-stats /bin/ftvm log stats /tmp/l1.ftlog

# Typed input: the guest's shell on the console gets two commands.
# A fifo keeps stdin open while the lines trickle in.
mkfifo /tmp/typed.fifo
(sleep 16; printf 'echo typed-$((6*7))\n'; sleep 2; printf 'poweroff\n'; sleep 30) >/tmp/typed.fifo &
run linux-input-record sh -c "/bin/ftvm record --log /tmp/in.ftlog $K --cmdline quiet </tmp/typed.fifo"
run linux-input-replay /bin/ftvm replay --log /tmp/in.ftlog $R

run guest-record /bin/ftvm record --no-stdin --log /tmp/g.ftlog --cmdline seconds=1
run guest-replay /bin/ftvm replay --log /tmp/g.ftlog
exit 0
