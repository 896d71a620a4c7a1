#!/usr/bin/env bash
# Installs what ftvm needs on a fresh Debian machine and builds it.
# Safe to run again; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v objdump >/dev/null || need_pkgs+=(binutils)
command -v python3 >/dev/null || need_pkgs+=(python3)
# gdb: tests/gdb.rs debugs replays with it (ftvm replay --gdb).
command -v gdb >/dev/null || need_pkgs+=(gdb)
# The lab (a standard KVM inside QEMU's emulator, for Linux guests):
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v lz4 >/dev/null || need_pkgs+=(lz4)
command -v zstd >/dev/null || need_pkgs+=(zstd)
# ip: tests/net.rs configures the tap devices it makes.
command -v ip >/dev/null || need_pkgs+=(iproute2)
# The etcd witness: protoc builds the etcd-client crate's gRPC code; a real
# 3-member etcd runs in tests/ft_etcd.rs (scripts/etcd-cluster.sh for users).
command -v protoc >/dev/null || need_pkgs+=(protobuf-compiler)
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
command -v etcdctl >/dev/null || need_pkgs+=(etcd-client)
# openssl: tests/ft_etcd.rs makes a CA and certificates for etcd over TLS.
command -v openssl >/dev/null || need_pkgs+=(openssl)
if ((${#need_pkgs[@]})); then
    echo "setup: installing ${need_pkgs[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm does not exist; ftvm needs KVM to run guests" >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: warning: no read/write permission on /dev/kvm (join the 'kvm' group)" >&2
fi
# The network card's tap (ftvm --net, tests/net.rs).
if [ ! -e /dev/net/tun ]; then
    modprobe tun 2>/dev/null || sudo -n modprobe tun 2>/dev/null ||
        echo "setup: warning: no /dev/net/tun (modprobe tun); --net and tests/net.rs need it" >&2
fi

cargo build --release --locked --workspace >&2
echo "setup: built target/release/ftvm" >&2
# The Linux guest (a stock Debian cloud kernel and a busybox initramfs).
scripts/linux-guest.sh >&2
