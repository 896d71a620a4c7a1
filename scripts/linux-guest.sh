#!/usr/bin/env bash
# Builds guest/linux/out/ (a stock Debian cloud kernel and a busybox initramfs
# with guest/linux/init) reproducibly from Debian packages.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/linux-guest.sh [--force] [-h]

Builds guest/linux/out/ from Debian packages:
  bzImage              the stock kernel of linux-image-cloud-amd64 (its vmlinuz)
  vmlinux              the uncompressed ELF kernel extracted from bzImage
  config               the kernel's build configuration
  initramfs.cpio.gz    static busybox + guest/linux/init + the virtio-net
                       modules of the same kernel (cpio newc, fixed
                       mtimes, sorted names: byte-identical across runs)
  VERSION, SHA256SUMS  package versions; checksums of the files above

Downloads (apt-get download, no installation) are cached in build/linux-guest/;
the output is rebuilt only when the packages, the init or this script change.

Options:
  --force    rebuild even if nothing changed
  -h, --help this text

Environment: LINUX_GUEST_KERNEL_PKG overrides the kernel package (default: the
dependency of linux-image-cloud-amd64, e.g. linux-image-6.1.0-56-cloud-amd64).
EOF
}

log() { echo "linux-guest: $*" >&2; }
die() { echo "linux-guest: error: $*" >&2; exit 1; }

FORCE=0
while (($#)); do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --force) FORCE=1; shift ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT=$ROOT/scripts/linux-guest.sh
INIT=$ROOT/guest/linux/init
OUT=$ROOT/guest/linux/out
CACHE=$ROOT/build/linux-guest
EPOCH=0 # mtime of every file in the initramfs
[ -f "$INIT" ] || die "$INIT is missing"
mkdir -p "$CACHE/debs"

# ------------------------------------------------------------------ tools
# shellcheck source-path=SCRIPTDIR source=lib/apt.sh
. "$ROOT/scripts/lib/apt.sh"
apt_install_missing cpio:cpio gzip:gzip xz:xz-utils zstd:zstd lz4:lz4 bzip2:bzip2 sha256sum:coreutils
for t in apt-get apt-cache dpkg-deb cpio gzip sha256sum; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

# ------------------------------------------------------ resolve and download
# The kernel: the linux-image package linux-image-cloud-amd64 depends on.
# Name and version come from apt_download_resolving, which resolves them
# again after an apt-get update: the stamp below keys off what it settled on.
if [ -n "${LINUX_GUEST_KERNEL_PKG-}" ]; then
    apt_download_resolving "$CACHE/debs" "$LINUX_GUEST_KERNEL_PKG"
else
    apt_download_resolving "$CACHE/debs" --dep-of linux-image-cloud-amd64 'linux-image-[^ ]*-cloud-amd64'
fi
KPKG=$APT_PKG KVER=$APT_VER KDEB=$APT_DEB
apt_download_resolving "$CACHE/debs" busybox-static
BPKG=$APT_PKG BVER=$APT_VER BDEB=$APT_DEB

STAMP=$(printf '%s\n' "$KPKG $KVER" "$BPKG $BVER" "$(sha256sum <"$INIT")" "$(sha256sum <"$SCRIPT")" | sha256sum | cut -d' ' -f1)

summary() {
    echo "linux-guest: $OUT" >&2
    sed 's/^/  /' "$OUT/VERSION" >&2
    (cd "$OUT" && for f in bzImage vmlinux config initramfs.cpio.gz; do
        printf '  %-18s %10d bytes  %s\n' "$f" "$(stat -c %s "$f")" "$(grep " $f\$" SHA256SUMS | cut -c1-16)"
    done) >&2
}

if ((!FORCE)) && [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$STAMP" ] \
    && (cd "$OUT" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1); then
    log "up to date"
    summary
    exit 0
fi

# ------------------------------------------------------------------ build
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
NEW=$WORK/out
mkdir -p "$NEW" "$WORK/k" "$WORK/b"

# The network card's drivers (ftvm --net), in load order: each one's
# dependencies (modinfo's depends=) come before it, checked below.
NET_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net)
log "extracting $KPKG $KVER"
pats=()
for m in "${NET_MODULES[@]}"; do pats+=("*/$m.ko*"); done
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$WORK/k" --wildcards './boot/vmlinuz-*' './boot/config-*' "${pats[@]}" \
    || die "extracting /boot and the virtio-net modules from $KDEB failed"
cp "$WORK"/k/boot/vmlinuz-* "$NEW/bzImage" || die "no vmlinuz in $KDEB"
cp "$WORK"/k/boot/config-* "$NEW/config" || die "no config in $KDEB"
KREL=$(basename "$WORK"/k/boot/vmlinuz-*); KREL=${KREL#vmlinuz-}

# vmlinux: like the kernel's scripts/extract-vmlinux, find a compressed payload
# by its magic, decompress it, and keep the first result that is an ELF file
is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = "177ELF" ]; }
try_payload() { # name magic-regex command...
    local name=$1 magic=$2 off offs; shift 2
    offs=$(LC_ALL=C grep -obUaP "$magic" "$NEW/bzImage" | cut -d: -f1) || true
    [ -n "$offs" ] || return 1
    if ! command -v "$1" >/dev/null; then log "  ($name magic found but no $1 tool: skipped)"; return 1; fi
    for off in $offs; do
        tail -c +$((off + 1)) "$NEW/bzImage" | "$@" >"$WORK/vmlinux" 2>/dev/null || true
        if is_elf "$WORK/vmlinux"; then
            log "  vmlinux: $name payload at offset $off"
            mv "$WORK/vmlinux" "$NEW/vmlinux"
            return 0
        fi
    done
    return 1
}
log "extracting vmlinux from bzImage"
try_payload gzip  '\x1f\x8b\x08'             gzip -dc ||
try_payload xz    '\xfd\x37\x7a\x58\x5a\x00' xz -dc ||
try_payload bzip2 'BZh'                      bzip2 -dc ||
try_payload lzma  '\x5d\x00\x00\x00'         xz -dc --format=lzma ||
try_payload lzo   '\x89\x4c\x5a'             lzop -dc ||
try_payload lz4   '\x02\x21\x4c\x18'         lz4 -dc ||
try_payload zstd  '\x28\xb5\x2f\xfd'         zstd -dc ||
die "no compressed ELF payload found in the bzImage"

log "building initramfs ($BPKG $BVER + guest/linux/init)"
dpkg-deb --fsys-tarfile "$BDEB" | tar -x -C "$WORK/b" ./bin/busybox || die "no /bin/busybox in $BDEB"
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
cp "$WORK/b/bin/busybox" "$R/bin/busybox"
"$R/bin/busybox" --list-full | LC_ALL=C sort | while read -r p; do
    [ "$p" = bin/busybox ] || [ -e "$R/$p" ] || [ -L "$R/$p" ] || ln -s /bin/busybox "$R/$p"
done
[ -e "$R/bin/sh" ] || ln -s /bin/busybox "$R/bin/sh"
cp "$INIT" "$R/init"
mkdir -p "$R/lib/modules/net"
loaded=","
for m in "${NET_MODULES[@]}"; do
    f=$(find "$WORK/k" -name "$m.ko*" | head -1)
    [ -n "$f" ] || die "module $m.ko not found in $KDEB"
    case $f in
        *.ko) cp "$f" "$R/lib/modules/net/$m.ko" ;;
        *.ko.xz) xz -dc "$f" >"$R/lib/modules/net/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$R/lib/modules/net/$m.ko" ;;
        *) die "unknown module compression: $f" ;;
    esac
    deps=$(LC_ALL=C grep -a -o 'depends=[a-z0-9_,-]*' "$R/lib/modules/net/$m.ko" | head -1 | cut -d= -f2)
    for d in ${deps//,/ }; do
        [[ $loaded == *",${d//-/_},"* ]] || die "$m.ko needs $d, which is not loaded before it"
    done
    loaded+="$m,"
done
printf '%s\n' "${NET_MODULES[@]}" >"$R/lib/modules/net/order"
find "$R" -type d -exec chmod 0755 {} +
chmod 0755 "$R/bin/busybox" "$R/init"
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"
find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) \
    | gzip -n -9 >"$NEW/initramfs.cpio.gz"

cat >"$NEW/VERSION" <<EOF
kernel $KPKG $KVER ($KREL)
busybox $BPKG $BVER
init guest/linux/init sha256 $(sha256sum <"$INIT" | cut -d' ' -f1)
EOF
(cd "$NEW" && sha256sum bzImage vmlinux config initramfs.cpio.gz >SHA256SUMS)
echo "$STAMP" >"$NEW/.stamp"

rm -rf "$OUT.old"
[ -d "$OUT" ] && mv "$OUT" "$OUT.old"
mkdir -p "$(dirname "$OUT")"
mv "$NEW" "$OUT"
rm -rf "$OUT.old"
summary
cfg() { # CONFIG_X -> its value or "not set"
    local v
    v=$(sed -n "s/^$1=//p" "$OUT/config")
    echo "${v:-not set}"
}
{
    echo "  kernel $KREL config:"
    for c in CONFIG_PVH CONFIG_X86_TSC CONFIG_SERIAL_8250_CONSOLE CONFIG_HZ CONFIG_RANDOMIZE_BASE; do
        printf '    %-28s %s\n' "$c" "$(cfg $c)"
    done
    printf '    %-28s %s\n' compression "$(sed -n 's/^CONFIG_KERNEL_\([A-Z0-9]*\)=y$/\1/p' "$OUT/config")"
} >&2
