# shellcheck shell=bash disable=SC2034 # APT_* are set for the caller
# Debian package helpers shared by scripts/linux-guest.sh and scripts/lab.sh.
# Sourced, not run. The caller defines log MESSAGE and die MESSAGE (die does
# not return). Functions report through globals rather than stdout, so that
# they run in the caller's shell: APT_UPDATED must survive from one call to
# the next, which it would not across $(...).
#
# Package lists may be stale (a fresh machine, lists from an image): a
# version they name may be gone from the mirror, and the package a
# metapackage depends on (a kernel's ABI name) may have changed. So a failed
# resolve or download runs `apt-get update` (once per run) and then resolves
# the name and the version again before downloading again.

APT_UPDATED=0
# results of apt_resolve and apt_download_resolving, for the caller
APT_PKG='' APT_VER='' APT_DEB='' APT_ERR=''

# apt_as_root CMD...: CMD as root (through sudo unless we are root already)
apt_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_update_once: apt-get update, at most once per run
apt_update_once() {
    ((APT_UPDATED)) && return 0
    APT_UPDATED=1
    log "apt-get update"
    apt_as_root apt-get update -qq >&2 || die "apt-get update failed"
}

# apt_install PKG...: apt-get install; on failure update the lists and retry
apt_install() {
    log "installing Debian packages: $*"
    local cmd=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@")
    if ! apt_as_root "${cmd[@]}" >&2; then
        apt_update_once
        apt_as_root "${cmd[@]}" >&2 || die "could not install: $* (apt-get install failed)"
    fi
}

# apt_install_missing CMD:PKG... [-- PKG...]: installs, in one apt_install,
# the package of each CMD that is not on PATH and every PKG after --
apt_install_missing() {
    local need=()
    while (($#)) && [ "$1" != -- ]; do
        command -v "${1%%:*}" >/dev/null || need+=("${1#*:}")
        shift
    done
    (($#)) && shift
    need+=("$@")
    ((${#need[@]} == 0)) || apt_install "${need[@]}"
}

# resolve_dep META PATTERN: prints the first dependency of META whose whole
# name matches PATTERN (a sed basic regular expression); nothing if none
resolve_dep() {
    { apt-cache depends "$1" 2>/dev/null || true; } \
        | sed -n "s/^ *Depends: \($2\)\$/\1/p" | head -n 1
}

# apt_candidate PKG: prints the version apt would install; nothing if none
apt_candidate() {
    { apt-cache show --no-all-versions "$1" 2>/dev/null || true; } \
        | sed -n 's/^Version: //p' | head -n 1
}

# apt_resolve PKG | apt_resolve --dep-of META PATTERN: sets APT_PKG (PKG, or
# the dependency of META that resolve_dep finds) and APT_VER (its candidate);
# returns 1 with the reason in APT_ERR when the lists cannot say
apt_resolve() {
    APT_PKG='' APT_VER=''
    if [ "$1" = --dep-of ]; then
        APT_PKG=$(resolve_dep "$2" "$3")
        if [ -z "$APT_PKG" ]; then
            APT_ERR="cannot resolve the package behind $2 (apt-cache depends $2: no dependency matching $3)"
            return 1
        fi
    else
        APT_PKG=$1
    fi
    APT_VER=$(apt_candidate "$APT_PKG")
    if [ -z "$APT_VER" ]; then
        APT_ERR="package $APT_PKG has no candidate version (unknown to apt? check /etc/apt/sources.list)"
        return 1
    fi
}

# apt_deb_in DIR PKG VER: prints DIR's .deb of PKG VER (named as apt-get
# download names it, and checked with dpkg-deb); 1 if there is none
apt_deb_in() {
    local f
    for f in "$1/$2_${3//:/%3a}"_*.deb; do
        if [ -f "$f" ] && [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$3" ]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}

# apt_get_deb DIR PKG VER: sets APT_DEB to DIR's .deb of PKG VER, downloading
# it unless DIR has it; returns 1 with the reason in APT_ERR on failure
apt_get_deb() {
    local dir=$1 pkg=$2 ver=$3 opt=()
    APT_DEB=$(apt_deb_in "$dir" "$pkg" "$ver") && return 0
    rm -f -- "$dir/${pkg}_${ver//:/%3a}"_*.deb # a broken one, if any
    log "downloading $pkg $ver"
    [ "$(id -u)" -eq 0 ] && opt=(-o APT::Sandbox::User=root)
    if ! (cd "$dir" && apt-get download -q "${opt[@]}" "$pkg=$ver" >&2); then
        APT_ERR="apt-get download $pkg=$ver failed"
        return 1
    fi
    APT_DEB=$(apt_deb_in "$dir" "$pkg" "$ver") && return 0
    APT_ERR="apt-get download $pkg=$ver left no such .deb in $dir"
    return 1
}

# apt_download_resolving DIR PKG
# apt_download_resolving DIR --dep-of META PATTERN
# Resolves the package and its version (apt_resolve) and gets its .deb into
# DIR (apt_get_deb: reused when DIR has it). If either step fails and the
# lists were not updated yet in this run: apt-get update, resolve again (the
# name and the version may both have changed) and download again. Sets
# APT_PKG, APT_VER and APT_DEB; dies naming the package when it cannot.
apt_download_resolving() {
    local dir=$1
    shift
    mkdir -p "$dir"
    while :; do
        if apt_resolve "$@" && apt_get_deb "$dir" "$APT_PKG" "$APT_VER"; then
            return 0
        fi
        ((APT_UPDATED)) && break
        log "$APT_ERR; updating the package lists and resolving again"
        apt_update_once
    done
    die "$APT_ERR (package lists updated in this run)"
}
