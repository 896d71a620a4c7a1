#!/usr/bin/env bash
# The network failover demo, in the lab (scripts/lab.sh: a real KVM inside
# QEMU's emulator, where the stock Linux guest runs): the guest serves a
# generated file with busybox httpd under fault tolerance (witness, primary
# and backup, each role's tap on one bridge in the lab machine); the lab
# machine downloads it while the primary is killed (kill -9) in the middle;
# the backup takes over the guest and its TCP connection. ROUNDS (default
# 5) downloads, each with a kill and a new backup for the next. Each round
# ends with one line
#   net_failover stall_ms=<longest pause the client saw> bytes=<downloaded> sha256_ok=<1|0> resets=<connections reset>
# and the script exits non-zero unless every round has sha256_ok=1 resets=0.
# Options (environment): ROUNDS, NET_LINES (the file is `seq 1 NET_LINES`,
# default 300000: 2 MB), FTVM (binary; default: build target/release/ftvm).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${FTVM:-}" ]; then
    scripts/setup.sh
    FTVM=$PWD/target/release/ftvm
fi
[ -e guest/linux/out/vmlinux ] || scripts/linux-guest.sh
out=$(mktemp /tmp/ftvm-net-demo.XXXXXX)
trap 'rm -f "$out"' EXIT
rounds=${ROUNDS:-5}
scripts/lab.sh --timeout $((400 + rounds * 220)) --ftvm "$FTVM" \
    --file guest/linux/out/vmlinux:/g/vmlinux --file guest/linux/out/initramfs.cpio.gz:/g/initrd \
    --file tests/lab/net-ft.sh:/net-ft.sh --file tests/lab/lib.sh:/lib.sh -- env ROUNDS="$rounds" NET_LINES="${NET_LINES:-300000}" sh /net-ft.sh >"$out" || true
if grep -q '^=== net-ft-failed' "$out"; then
    sed -n '/^=== net-ft-failed/,/^=== end net-ft.stderr/p' "$out" >&2
fi
grep -h '^killed the primary\|^net_failover ' "$out" || true
n=$(grep -c '^net_failover ' "$out" || true)
good=$(grep -c '^net_failover .* sha256_ok=1 resets=0$' "$out" || true)
echo "demo: $good of $rounds rounds downloaded whole, without a reset ($n ran)" >&2
[ "$n" -eq "$rounds" ] && [ "$good" -eq "$rounds" ]
