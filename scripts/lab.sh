#!/usr/bin/env bash
# The lab: a standard KVM (Debian's kvm-amd) inside QEMU's TCG emulator, on an
# emulated AMD CPU with SVM and nested paging. Runs one command there and exits
# with its status. Built only from Debian packages; see /work/shared/kvm-notes.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/lab.sh [OPTIONS] -- COMMAND [ARGS...]

Boots Debian's stock amd64 kernel in QEMU (TCG, -cpu EPYC,+svm,+npt), loads
irqbypass, kvm, ccp and kvm-amd (and tun, llc, stp, bridge), checks /dev/kvm, runs COMMAND (through sh -c,
arguments quoted) in that machine with cwd /, powers off, and exits with
COMMAND's status. Only COMMAND's console output is passed through.

Options:
  --timeout SECS        hard wall-clock limit for the whole run (default 600)
  --mem MB              memory of the lab machine (default 2048)
  --file HOST[:GUEST]   copy HOST (file or directory) into the lab at GUEST; may
                        be repeated. Without :GUEST, a relative HOST keeps its
                        relative path under / (the command runs in /) and an
                        absolute one keeps its path. Shared libraries of
                        dynamic executables are added (found with ldd).
  --ftvm PATH           ftvm binary to put at /bin/ftvm (default:
                        target/release/ftvm if present, else target/debug/ftvm)
  --no-ftvm             do not add /bin/ftvm
  --verbose             show the whole console (kernel boot messages included)
  -h, --help            this text

Exit status: COMMAND's status; 124 on timeout; 125 when the lab itself failed.
Cache: build/lab/ (kernel, modules, base initramfs; delete it to refresh).
Environment: LAB_KERNEL_PKG overrides the kernel package (default: the
dependency of linux-image-amd64, e.g. linux-image-6.1.0-56-amd64);
LAB_MACHINE the QEMU machine type (default pc; q35 works too).
EOF
}

log() { echo "lab: $*" >&2; }
die() { echo "lab: error: $*" >&2; exit 125; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$ROOT/build/lab
TIMEOUT=600
MEM=2048
VERBOSE=0
FTVM=
NO_FTVM=0
FILES=()

while (($#)); do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --timeout) [[ ${2-} =~ ^[0-9]+$ ]] || die "--timeout needs a number of seconds"; TIMEOUT=$2; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; [[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout needs a number of seconds"; shift ;;
        --mem) [[ ${2-} =~ ^[0-9]+$ ]] || die "--mem needs a number of MB"; MEM=$2; shift 2 ;;
        --mem=*) MEM=${1#*=}; [[ $MEM =~ ^[0-9]+$ ]] || die "--mem needs a number of MB"; shift ;;
        --file) [[ -n ${2-} ]] || die "--file needs HOSTPATH[:GUESTPATH]"; FILES+=("$2"); shift 2 ;;
        --file=*) FILES+=("${1#*=}"); shift ;;
        --ftvm) [[ -n ${2-} ]] || die "--ftvm needs a path"; FTVM=$2; shift 2 ;;
        --no-ftvm) NO_FTVM=1; shift ;;
        --verbose) VERBOSE=1; shift ;;
        --) shift; break ;;
        *) echo "lab: unknown argument: $1 (the command goes after --)" >&2; usage >&2; exit 125 ;;
    esac
done
(($#)) || { usage >&2; exit 125; }
CMD=("$@")

# ---------------------------------------------------------------- host tools
# shellcheck source-path=SCRIPTDIR source=lib/apt.sh
. "$ROOT/scripts/lib/apt.sh"
extra=()
{ [ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1; } || extra+=(busybox-static)
apt_install_missing qemu-system-x86_64:qemu-system-x86 cpio:cpio gzip:gzip timeout:coreutils \
    ldd:libc-bin xz:xz-utils zstd:zstd -- "${extra[@]}"
for t in qemu-system-x86_64 cpio gzip timeout ldd apt-get dpkg-deb flock od; do
    command -v "$t" >/dev/null || die "missing tool after install: $t"
done
BUSYBOX=/bin/busybox
[ -x $BUSYBOX ] || die "$BUSYBOX (package busybox-static) is missing"
ldd $BUSYBOX >/dev/null 2>&1 && die "$BUSYBOX is not static: install busybox-static (not busybox)"

# ------------------------------------------------------- L1 kernel and modules
# kvm-amd and what it needs; tun and the bridge (with its stp and llc) for
# the guests' network cards (taps on a bridge, tests/lab/net.sh).
MODULES=(irqbypass kvm ccp kvm-amd tun llc stp bridge)
KDIR=$CACHE/kernel
mkdir -p "$CACHE"
# one lab at a time builds the cache
exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"
kernel_cached() {
    [ -s "$KDIR/vmlinuz" ] && [ -s "$KDIR/VERSION" ] || return 1
    if [ -n "${LAB_KERNEL_PKG-}" ] && [ "$(cut -d' ' -f1 "$KDIR/VERSION")" != "$LAB_KERNEL_PKG" ]; then return 1; fi
    local m
    for m in "${MODULES[@]}"; do [ -s "$KDIR/$m.ko" ] || return 1; done
}
if ! kernel_cached; then
    tmp=$(mktemp -d "$CACHE/kernel.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    # the kernel: LAB_KERNEL_PKG, or the one linux-image-amd64 depends on
    if [ -n "${LAB_KERNEL_PKG-}" ]; then
        apt_download_resolving "$tmp" "$LAB_KERNEL_PKG"
    else
        apt_download_resolving "$tmp" --dep-of linux-image-amd64 'linux-image-[^ ]*-amd64'
    fi
    deb=$APT_DEB
    log "L1 kernel $APT_PKG $APT_VER: extracting into $KDIR"
    mkdir -p "$tmp/x"
    pats=()
    for m in "${MODULES[@]}"; do pats+=("*/$m.ko*"); done
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/x" --wildcards './boot/vmlinuz-*' './boot/config-*' "${pats[@]}" \
        || die "extracting $deb failed"
    mkdir -p "$tmp/k"
    cp "$tmp"/x/boot/vmlinuz-* "$tmp/k/vmlinuz" || die "no /boot/vmlinuz-* in $deb"
    cp "$tmp"/x/boot/config-* "$tmp/k/config" || true
    for m in "${MODULES[@]}"; do
        f=$(find "$tmp/x" -name "$m.ko*" | head -1)
        [ -n "$f" ] || die "module $m.ko not found in $deb"
        case $f in
            *.ko) cp "$f" "$tmp/k/$m.ko" ;;
            *.ko.xz) xz -dc "$f" >"$tmp/k/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$tmp/k/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$tmp/k/$m.ko" ;;
            *) die "unknown module compression: $f" ;;
        esac
    done
    echo "$(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)" >"$tmp/k/VERSION"
    rm -rf "$KDIR" "$CACHE/base.cpio"
    mv "$tmp/k" "$KDIR"
    rm -rf "$tmp"; trap - EXIT
    log "L1 kernel: $(cat "$KDIR/VERSION")"
fi

# --------------------------------------------------------- base initramfs
# busybox with its applet links and the modules; cached.
BASE=$CACHE/base.cpio
if [ ! -s "$BASE" ] || [ "$BUSYBOX" -nt "$BASE" ] || [ "$KDIR/VERSION" -nt "$BASE" ]; then
    log "building base initramfs"
    tmp=$(mktemp -d "$CACHE/base.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,lib/modules/lab}
    cp $BUSYBOX "$tmp/bin/busybox"
    $BUSYBOX --list-full | while read -r p; do
        [ "$p" = bin/busybox ] || [ -e "$tmp/$p" ] || ln -s /bin/busybox "$tmp/$p"
    done
    [ -e "$tmp/bin/sh" ] || ln -s busybox "$tmp/bin/sh"
    for m in "${MODULES[@]}"; do cp "$KDIR/$m.ko" "$tmp/lib/modules/lab/"; done
    (cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$tmp.cpio"
    mv "$tmp.cpio" "$BASE"
    rm -rf "$tmp"; trap - EXIT
fi
flock -u 9; exec 9>&-

# ------------------------------------------------------------ per-run archive
RUN=$(mktemp -d "${TMPDIR:-/tmp}/ftvm-lab.XXXXXX")
cleanup() { rm -rf "$RUN"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
STAGE=$RUN/root
mkdir -p "$STAGE/lab"

# place HOST at GUEST inside the stage (hard link when possible)
place() {
    local host=$1 guest=$2 dst
    dst=$STAGE/${guest#/}
    mkdir -p "$(dirname "$dst")"
    if [ -d "$host" ]; then
        cp -a -L "$host" "$dst" 2>/dev/null || cp -r -L "$host" "$dst" || die "cannot copy $host"
    else
        ln -f "$(realpath "$host")" "$dst" 2>/dev/null || cp -L "$host" "$dst" || die "cannot copy $host"
        chmod u+r "$dst"
    fi
}

ELFS=()
is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = "177ELF" ]; }
add_file() { # spec
    local spec=$1 host guest
    if [[ $spec == *:* ]]; then host=${spec%%:*}; guest=${spec#*:}; else host=$spec; guest=$spec; fi
    [ -e "$host" ] || die "--file: $host does not exist"
    [ -n "$guest" ] || die "--file $spec: empty guest path"
    [[ $guest == /* ]] || guest=/$guest
    place "$host" "$guest"
    local f
    while IFS= read -r -d '' f; do
        if [ -x "$f" ] && is_elf "$f"; then ELFS+=("$f"); fi
    done < <(find "$STAGE/${guest#/}" -type f -print0)
}

have_ftvm=0
for spec in "${FILES[@]}"; do if [[ $spec == *:/bin/ftvm ]]; then have_ftvm=1; fi; done
if ((NO_FTVM == 0 && have_ftvm == 0)); then
    if [ -z "$FTVM" ]; then
        if [ -x "$ROOT/target/release/ftvm" ]; then FTVM=$ROOT/target/release/ftvm
        elif [ -x "$ROOT/target/debug/ftvm" ]; then FTVM=$ROOT/target/debug/ftvm; fi
    fi
    if [ -n "$FTVM" ]; then
        [ -x "$FTVM" ] || die "--ftvm: $FTVM is not an executable"
        FILES=("$FTVM:/bin/ftvm" "${FILES[@]}")
    else
        log "note: no target/{release,debug}/ftvm built; /bin/ftvm will be missing"
    fi
fi
for spec in "${FILES[@]}"; do add_file "$spec"; done

# shared libraries (and the dynamic loader) of the dynamic executables
declare -A LIBS=()
for f in "${ELFS[@]}"; do
    out=$(ldd "$f" 2>/dev/null) || continue
    while read -r a b c _; do
        if [ "$b" = "=>" ] && [[ $c == /* ]]; then LIBS[$c]=1
        elif [[ $a == /* ]]; then LIBS[$a]=1
        elif [ "$b" = "=>" ] && [ "$c" = "not" ]; then die "$f needs $a, which ldd cannot find"
        fi
    done <<<"$out"
done
for l in "${!LIBS[@]}"; do
    [ -e "$STAGE/${l#/}" ] || { mkdir -p "$(dirname "$STAGE/${l#/}")"; cp -L "$l" "$STAGE/${l#/}"; }
done

# the command, each word single-quoted for sh -c
q=
for a in "${CMD[@]}"; do q+="'${a//\'/\'\\\'\'}' "; done
printf '%s\n' "$q" >"$STAGE/lab/cmd"

NONCE=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
START="LAB-START-$NONCE"
cat >"$STAGE/init" <<EOF
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
lab_fail() { echo "LAB-FAILED: \$*"; sync; poweroff -f; sleep 10; }
for m in ${MODULES[*]}; do
    insmod /lib/modules/lab/\$m.ko || lab_fail "insmod \$m.ko failed"
done
i=0; while [ ! -c /dev/kvm ] && [ \$i -lt 50 ]; do sleep 0.1; i=\$((i+1)); done
[ -c /dev/kvm ] || lab_fail "/dev/kvm did not appear (dmesg: \$(dmesg | grep -i -E 'kvm|svm' | tail -3))"
[ $VERBOSE = 1 ] || dmesg -n 1
cd /
echo
echo "$START"
/bin/sh -c "\$(cat /lab/cmd)"
rc=\$?
sync
echo
echo "LAB-EXIT-STATUS=\$rc"
poweroff -f
sleep 10
EOF
chmod 755 "$STAGE/init"

# the per-run archive is not compressed: decompressing in TCG is slow
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$RUN/run.cpio" \
    || die "building the per-run initramfs failed"
cat "$BASE" "$RUN/run.cpio" >"$RUN/initrd"
rm -rf "$STAGE" "$RUN/run.cpio"

# ------------------------------------------------------------------ boot
APPEND="console=ttyS0 panic=-1 quiet"
((VERBOSE)) && APPEND="console=ttyS0 panic=-1"
# shellcheck disable=SC2054
QEMU=(qemu-system-x86_64 -machine "${LAB_MACHINE:-pc}" -accel tcg -cpu EPYC,+svm,+npt -m "$MEM" -smp 1
      -kernel "$KDIR/vmlinuz" -initrd "$RUN/initrd" -append "$APPEND"
      -nographic -no-reboot -nic none -monitor none -serial stdio)
log "booting the lab ($(cat "$KDIR/VERSION"), ${MEM} MB, timeout ${TIMEOUT}s)"

STATUS_FILE=$RUN/status
CONSOLE_LOG=$RUN/console.log
: >"$CONSOLE_LOG"
LAST_LOG=$CACHE/last-console.log
filter() {
    # The init prints a newline, then the status marker: one empty line held
    # back just before the marker is that newline, not the command's output.
    local started=$VERBOSE line held=0
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        printf '%s\n' "$line" >>"$CONSOLE_LOG"
        if [[ $line == "LAB-EXIT-STATUS="* ]] && [[ ${line#LAB-EXIT-STATUS=} =~ ^[0-9]+$ ]]; then
            echo "${line#LAB-EXIT-STATUS=}" >"$STATUS_FILE"
            held=0; started=$VERBOSE
            ((VERBOSE)) && printf '%s\n' "$line"
            continue
        fi
        if [[ $line == "LAB-FAILED: "* ]]; then
            echo "${line#LAB-FAILED: }" >"$RUN/failed"
        fi
        if ((started)); then
            if ((held)); then echo; held=0; fi
            if [ -z "$line" ] && ((!VERBOSE)); then held=1; else printf '%s\n' "$line"; fi
        elif [[ $line == "$START" ]]; then started=1
        fi
    done
    if ((held)); then echo; fi
}
set +e
timeout --foreground -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>"$RUN/qemu.err" | filter
rcs=("${PIPESTATUS[@]}")
set -e
cp "$CONSOLE_LOG" "$LAST_LOG.$$" && mv -f "$LAST_LOG.$$" "$LAST_LOG"
qrc=${rcs[0]}
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
    log "timed out after ${TIMEOUT}s (console log: $LAST_LOG)"
    exit 124
fi
if [ -s "$STATUS_FILE" ]; then
    rc=$(cat "$STATUS_FILE")
    log "command exited with status $rc"
    exit "$rc"
fi
if [ -s "$RUN/failed" ]; then
    log "lab failed: $(cat "$RUN/failed")"
elif [ "$qrc" -ne 0 ]; then
    log "qemu failed (status $qrc): $(grep -v 'TCG doesn.t support' "$RUN/qemu.err" | tail -5)"
else
    log "lab failed: the machine stopped without reporting a status"
fi
log "last console lines (full log: $LAST_LOG):"
tail -15 "$CONSOLE_LOG" >&2
exit 125
