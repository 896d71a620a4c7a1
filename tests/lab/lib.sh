#!/bin/sh
# Shared by the lab's session scripts (copied in as /lib.sh; `. /lib.sh`).
# Each scenario's output goes between "=== NAME rc=N ===" and
# "=== end NAME ===" lines for tests/lab.rs to check.
section() { # name rc file
    echo "=== $1 rc=$2 ==="
    cat "$3"
    echo "=== end $1 ==="
}
# Waits until FILE holds PATTERN, at most TENTHS tenths of a second
# (default 3000); fails if it never does.
await() { # file pattern [tenths]
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null && [ $i -lt "${3:-3000}" ]; do sleep 0.1; i=$((i + 1)); done
    grep -q "$2" "$1"
}
# Waits for a background role at most SECS: its exit status; one still
# running then is said stuck in /tmp/stuck.err (with the witness's view,
# asked with the cluster key KEY) and killed, status 124.
await_exit() { # pid secs name witness key
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$1" 2>/dev/null; then
        echo "lab: $3 still running after $2 s: killed; the witness's view:" >>/tmp/stuck.err
        /bin/ftvm status --witness "$4" --key "$5" >>/tmp/stuck.err 2>&1
        kill -9 "$1"; wait "$1"; return 124
    fi
    wait "$1"
}
# The promoted backup's end: stuck or failed is said in /tmp/stuck.err;
# sets rc to its status if rc was 0.
await_promoted() { # pid witness key
    await_exit "$1" 60 "the backup (primary now)" "$2" "$3"
    e=$?
    [ $e -eq 0 ] && return 0
    echo "lab: the backup (primary now) ended with status $e" >>/tmp/stuck.err
    [ "$rc" -eq 0 ] && rc=$e
    return 0
}
cs() { cut -d' ' -f1 /proc/uptime | tr -d .; } # centiseconds since the lab booted
