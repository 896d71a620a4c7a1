#!/bin/sh
# Runs inside the lab (a real kvm-amd under QEMU's emulator): the Linux guest
# and the test guest under ftvm, recorded and replayed. Each scenario's
# output goes between "=== NAME rc=N ===" and "=== end NAME ===" lines for
# tests/lab.rs to check.
K="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
R="--kernel /g/vmlinux --initrd /g/initrd"
. /lib.sh
# Every scenario and every wait is bounded, so one that hangs fails its own
# test (rc 137 for a killed run, 124 for a stuck role, with what it printed)
# instead of running the whole session into its timeout (CI, 2026-11-30:
# the session timed out and every scenario's test failed, without a word on
# which one hung). The bounds are several times what each takes in the lab
# (10-40 s); one or two stuck scenarios fit in the session's time, a hang
# of every one does not.
run() { # name, command...
    name=$1; shift
    timeout -s KILL 150 "$@" >/tmp/$name.out 2>/tmp/$name.err
    rc=$?
    section "$name" $rc /tmp/$name.out
    section "$name.stderr" $rc /tmp/$name.err
}

# The compressed bzImage, as users pass it: ftvm extracts the vmlinux.
run linux-run /bin/ftvm run --no-stdin --kernel /g/bzImage --initrd /g/initrd --mem 256M --cmdline "ftvm.poweroff=1 quiet"
for n in 1 2; do
    run linux-record-$n /bin/ftvm record --log /tmp/l$n.ftlog --no-stdin $K --cmdline "ftvm.poweroff=1 quiet"
    run linux-replay-$n /bin/ftvm replay --log /tmp/l$n.ftlog $R
done
run linux-stats /bin/ftvm log stats /tmp/l1.ftlog

# Typed input: the guest's shell on the console gets two commands, typed
# once the workload has ended (the shell is up; typing earlier races with
# the console's setup, which drops what it finds, and the emulated lab's
# speed depends on how busy the host is). A fifo keeps stdin open while
# the lines trickle in.
mkfifo /tmp/typed.fifo
(for _ in $(seq 600); do grep -q FTVM-WORKLOAD-END /tmp/linux-input-record.out 2>/dev/null && break; sleep 0.5; done
 sleep 2; printf 'echo typed-$((6*7))\n'; sleep 2; printf 'poweroff\n'; sleep 30) >/tmp/typed.fifo &
run linux-input-record sh -c "/bin/ftvm record --log /tmp/in.ftlog $K --cmdline quiet </tmp/typed.fifo"
run linux-input-replay /bin/ftvm replay --log /tmp/in.ftlog $R

# Fault tolerance with Linux: witness, backup, primary and a console, all
# with one cluster key; the primary is killed in the middle of the workload.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
W=127.0.0.1:7000
/bin/ftvm keygen --out /tmp/ft.key 2>/tmp/ft-witness.err
/bin/ftvm witness --listen $W --key /tmp/ft.key 2>>/tmp/ft-witness.err &
sleep 0.5
/bin/ftvm backup --witness $W --listen 127.0.0.1:7101 --key /tmp/ft.key $R >/dev/null 2>/tmp/ft-backup.err &
B=$!
sleep 1
/bin/ftvm primary --witness $W --listen 127.0.0.1:7100 --key /tmp/ft.key --no-stdin $K --cmdline "ftvm.poweroff=1 quiet" >/dev/null 2>/tmp/ft-primary.err &
P=$!
sleep 1
/bin/ftvm console --witness $W --key /tmp/ft.key --give-up 60 >/tmp/ft-console.out 2>/tmp/ft-console.err &
C=$!
# Wait until the workload has started, then kill the primary.
i=0
while ! grep -q FTVM-WORKLOAD-BEGIN /tmp/ft-console.out 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
sleep 1
: >/tmp/stuck.err
kill -9 $P
await_exit $C 240 console $W /tmp/ft.key
rc=$?
await_promoted $B $W /tmp/ft.key
section ft-console $rc /tmp/ft-console.out
cat /tmp/stuck.err /tmp/ft-console.err /tmp/ft-backup.err /tmp/ft-witness.err >/tmp/ft-all.err
section ft-console.stderr $rc /tmp/ft-all.err

# Fault tolerance while a process spins: the primary is killed while a
# CPU-bound process runs at the shell; the new primary answers what is
# typed next (the console resends it) and powers off.
W2=127.0.0.1:7200
/bin/ftvm witness --listen $W2 --key /tmp/ft.key 2>/tmp/fs-witness.err &
sleep 0.5
/bin/ftvm backup --witness $W2 --listen 127.0.0.1:7201 --key /tmp/ft.key $R >/dev/null 2>/tmp/fs-backup.err &
B2=$!
sleep 1
/bin/ftvm primary --witness $W2 --listen 127.0.0.1:7202 --key /tmp/ft.key --no-stdin $K --cmdline quiet >/dev/null 2>/tmp/fs-primary.err &
P2=$!
sleep 1
mkfifo /tmp/fs.fifo
/bin/ftvm console --witness $W2 --key /tmp/ft.key --give-up 60 </tmp/fs.fifo >/tmp/fs-console.out 2>/tmp/fs-console.err &
C2=$!
exec 3>/tmp/fs.fifo
await /tmp/fs-console.out FTVM-WORKLOAD-END 1800
sleep 2
printf '(while :; do :; done) & sleep 1; echo before-$((6*7))\n' >&3
i=0; while ! grep -q before-42 /tmp/fs-console.out 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
sleep 1
: >/tmp/stuck.err
kill -9 $P2
sleep 3
printf 'sleep 1; echo after-$((6*7)); kill $!; poweroff\n' >&3
await_exit $C2 240 console $W2 /tmp/ft.key
rc=$?
exec 3>&-
await_promoted $B2 $W2 /tmp/ft.key
section fs-console $rc /tmp/fs-console.out
cat /tmp/stuck.err /tmp/fs-console.err /tmp/fs-backup.err /tmp/fs-witness.err >/tmp/fs-all.err
section fs-console.stderr $rc /tmp/fs-all.err

# A CPU-bound process at the shell: without resyncs the guest never gets
# another timer tick and the next command is never answered.
mkfifo /tmp/spin.fifo
# `sleep 1` ends only if timer ticks preempt the spinner. Typed once the
# shell is up (as for typed input above), poweroff once it answered.
seen() { i=0; while ! grep -q "$2" "$1" 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done; }
(seen /tmp/linux-spin-record.out FTVM-WORKLOAD-END; sleep 2
 printf '(while :; do :; done) & sleep 1; echo spin-$((6*7)); kill $!\n'
 seen /tmp/linux-spin-record.out spin-42; sleep 1; printf 'poweroff\n'; sleep 30) >/tmp/spin.fifo &
run linux-spin-record sh -c "/bin/ftvm record --log /tmp/spin.ftlog $K --cmdline quiet </tmp/spin.fifo"
run linux-spin-replay /bin/ftvm replay --log /tmp/spin.ftlog $R
run linux-spin-stats /bin/ftvm log stats /tmp/spin.ftlog

run guest-record /bin/ftvm record --no-stdin --log /tmp/g.ftlog --cmdline seconds=1
run guest-replay /bin/ftvm replay --log /tmp/g.ftlog
exit 0
