#!/usr/bin/env bash
# Installs what ftvm needs on a fresh Debian machine and builds it.
# Safe to run again; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v objdump >/dev/null || need_pkgs+=(binutils)
command -v python3 >/dev/null || need_pkgs+=(python3)
if ((${#need_pkgs[@]})); then
    echo "setup: installing ${need_pkgs[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm does not exist; ftvm needs KVM to run guests" >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: warning: no read/write permission on /dev/kvm (join the 'kvm' group)" >&2
fi

cargo build --release --locked --workspace >&2
echo "setup: built target/release/ftvm" >&2
