#!/usr/bin/env bash
# Starts (or stops) a 3-member etcd cluster on loopback ports for the etcd
# witness (`ftvm ... --witness etcd://...`), from Debian's etcd-server.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/etcd-cluster.sh start DIR [BASE_PORT]   # members m1..m3, data in DIR/m1..m3
       scripts/etcd-cluster.sh stop DIR

start: client ports BASE, BASE+1, BASE+2 (default 2379), peer ports BASE+10..12,
       127.0.0.1 only; waits until a leader is elected, then prints the
       --witness argument (etcd://127.0.0.1:BASE,...) on stdout. Logs: DIR/m*.log.
       Heartbeat 50 ms, election timeout 500 ms: etcd then grants 1 s leases.
stop:  kills the members started in DIR (their pids are in DIR/m*.pid).
USAGE
}

log() { echo "etcd-cluster: $*" >&2; }
die() { echo "etcd-cluster: error: $*" >&2; exit 1; }

(($# >= 2)) || { usage >&2; exit 2; }
cmd=$1 dir=$2 base=${3:-2379}
case $cmd in
    start) ;;
    stop)
        for f in "$dir"/m*.pid; do
            [ -f "$f" ] || continue
            kill "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        done
        log "stopped the members in $dir"
        exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

command -v etcd >/dev/null || die "etcd is not installed (Debian: apt-get install etcd-server etcd-client; scripts/setup.sh does it)"
command -v etcdctl >/dev/null || die "etcdctl is not installed (Debian: apt-get install etcd-client)"
mkdir -p "$dir"
initial="" endpoints=""
for i in 1 2 3; do
    initial+="${initial:+,}m$i=http://127.0.0.1:$((base + 9 + i))"
    endpoints+="${endpoints:+,}127.0.0.1:$((base + i - 1))"
done
for i in 1 2 3; do
    c=$((base + i - 1)) p=$((base + 9 + i))
    if [ -f "$dir/m$i.pid" ] && kill -0 "$(cat "$dir/m$i.pid")" 2>/dev/null; then
        die "member m$i of $dir is already running (pid $(cat "$dir/m$i.pid")); stop it first"
    fi
    etcd --name "m$i" --data-dir "$dir/m$i" \
        --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
        --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
        --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token "ftvm-$base" \
        --heartbeat-interval 50 --election-timeout 500 --logger zap --log-level warn \
        >/dev/null 2>"$dir/m$i.log" &
    echo $! >"$dir/m$i.pid"
done
for _ in $(seq 100); do
    if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --dial-timeout 1s endpoint status -w simple 2>/dev/null | grep -q ', true, '; then
        log "3 members up, data in $dir; stop with: scripts/etcd-cluster.sh stop $dir"
        echo "etcd://$endpoints"
        exit 0
    fi
    sleep 0.2
done
die "no leader after 20 s; see $dir/m*.log"
