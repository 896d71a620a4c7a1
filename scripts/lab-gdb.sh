#!/usr/bin/env bash
# Prints the path of a gdb for the lab: Debian's gdb-minimal (no Python, so
# it runs from a bare initramfs, unlike gdb, whose embedded Python needs its
# standard library), extracted from its package into build/lab/gdb-minimal/
# without installing it (it conflicts with the gdb package).
set -euo pipefail
log() { echo "lab-gdb: $*" >&2; }
die() { echo "lab-gdb: error: $*" >&2; exit 1; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=$ROOT/build/lab/gdb-minimal
if [ ! -x "$DIR/usr/bin/gdb" ]; then
    # shellcheck source-path=SCRIPTDIR source=lib/apt.sh
    . "$ROOT/scripts/lib/apt.sh"
    mkdir -p "$ROOT/build/lab/debs"
    apt_download_resolving "$ROOT/build/lab/debs" gdb-minimal
    tmp=$(mktemp -d "$ROOT/build/lab/gdb-minimal.XXXXXX")
    dpkg-deb -x "$APT_DEB" "$tmp" || die "extracting $APT_DEB failed"
    [ -x "$tmp/usr/bin/gdb" ] || die "no usr/bin/gdb in $APT_DEB"
    rm -rf "$DIR"
    mv "$tmp" "$DIR"
    log "gdb-minimal $APT_VER in $DIR"
fi
echo "$DIR/usr/bin/gdb"
