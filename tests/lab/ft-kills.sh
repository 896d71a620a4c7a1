#!/bin/sh
# Runs inside the lab: the Linux guest under fault tolerance, its primary
# killed (kill -9) at a random moment of its boot or workload, ROUNDS times,
# each round a fresh cluster. The moments come from SEED (printed by
# tests/lab.rs; FTVM_LAB_SEED=N reruns one). Each round prints a section
# "ft-kill-N" (what the console saw) and "ft-kill-N.stderr" (when the kill
# came, and what the roles said), after a plain run ("plain") of the same
# guest; tests/lab.rs checks that each console saw the workload's output
# whole, once, in order, as the plain run printed it.
K="--kernel /g/vmlinux --initrd /g/initrd --mem 256M"
R="--kernel /g/vmlinux --initrd /g/initrd"
ROUNDS=${ROUNDS:-5}
seed=${SEED:-1}
. /lib.sh
# The next pseudo-random number below $1, in RND (no subshell: the seed moves).
next() { seed=$(((seed * 1103515245 + 12345) % 2147483648)); RND=$((seed / 65536 % $1)); }
ms() { echo $(($(cs) * 10)); } # ms since the lab booted

ip link set lo up
# The reference: the workload as a plain run prints it.
/bin/ftvm run --no-stdin $K --cmdline "ftvm.poweroff=1 quiet" >/tmp/plain.out 2>/tmp/plain.err
rc=$?
section plain $rc /tmp/plain.out
section plain.stderr $rc /tmp/plain.err
/bin/ftvm keygen --out /tmp/k 2>/dev/null
n=1
while [ $n -le "$ROUNDS" ]; do
    base=$((7000 + n * 10))
    W=127.0.0.1:$base
    # Emptied here, not by the roles' redirections: those happen in the
    # children, after the waits below may have read last round's lines.
    for f in stuck.err w.err b.err p.err c.out c.err; do : >/tmp/$f; done
    /bin/ftvm witness --listen $W --key /tmp/k 2>/tmp/w.err &
    wit=$!
    sleep 0.5
    /bin/ftvm backup --witness $W --listen 127.0.0.1:$((base + 1)) --key /tmp/k $R >/dev/null 2>/tmp/b.err &
    b=$!
    await /tmp/b.err "waiting for the primary" 600
    /bin/ftvm primary --witness $W --listen 127.0.0.1:$((base + 2)) --key /tmp/k --no-stdin $K \
        --cmdline "ftvm.poweroff=1 quiet" >/dev/null 2>/tmp/p.err &
    p=$!
    # From the moment the backup holds the state (the log from boot) on:
    # a primary killed before it leaves a VM nobody can continue, which
    # is said lost (tests/ft_runs.rs), not failed over.
    await /tmp/b.err "receiving the log of view" 600
    t0=$(ms)
    /bin/ftvm console --witness $W --key /tmp/k --give-up 60 >/tmp/c.out 2>/tmp/c.err &
    c=$!
    # Up to 4 s after a random point: the backup holding the state (the
    # kernel boots), the init's first line, or the workload's start; at the
    # latest when the workload's end shows (the guest is then a second
    # from its poweroff: the backup goes live, or, if the primary's guest
    # had halted, releases its last output; tests/lab.rs accepts either).
    next 3
    case $RND in 0) after=ready ;; 1) after=FTVM-LINUX-UP ;; *) after=FTVM-WORKLOAD-BEGIN ;; esac
    [ $after = ready ] || await /tmp/c.out $after 1200
    next 4000
    at=$(($(ms) - t0 + RND))
    while [ $(($(ms) - t0)) -lt $at ] && ! grep -q FTVM-WORKLOAD-END /tmp/c.out 2>/dev/null; do sleep 0.05; done
    last=$(grep -a FTVM- /tmp/c.out | tail -1 | tr -d '\r')
    kill -9 $p
    killed=$(($(ms) - t0))
    await_exit $c 300 console $W /tmp/k
    rc=$?
    await_promoted $b $W /tmp/k
    kill $wit 2>/dev/null; wait $wit 2>/dev/null
    section "ft-kill-$n" $rc /tmp/c.out
    {
        echo "ft-kills: round $n: primary killed ${killed} ms after the backup held the state (aimed at ${at} ms: up to 4 s after ${after}; last marker seen: ${last:-none})"
        cat /tmp/stuck.err /tmp/c.err
        grep -v "log kept in memory" /tmp/b.err
        grep -v "log kept in memory" /tmp/p.err
        cat /tmp/w.err
    } >/tmp/round.err
    section "ft-kill-$n.stderr" $rc /tmp/round.err
    n=$((n + 1))
done
exit 0
