# shellcheck shell=bash
# The preamble the benchmark scripts (bench-record.sh, bench-ft.sh,
# bench-linux.sh) share: messages, usage from the script's header comment,
# option checks, the ftvm binary to measure, a work directory removed on
# exit. Sourced, not run; it changes to the repository's root directory.
# The caller sets BENCH_NAME (the prefix of messages) and BENCH_USAGE (the
# lines of its header comment that usage prints: a sed address range, e.g.
# 2,15) and may set BENCH_RC (the exit status of setup errors, default 1).

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$BENCH_ROOT" || exit 1

bench_err() { echo "$BENCH_NAME: $*" >&2; }
bench_die() {
    bench_err "$*"
    exit "${BENCH_RC:-1}"
}

# usage [STATUS]: prints the lines BENCH_USAGE of the script's header
# comment without their "# " and exits with STATUS (default 0)
usage() {
    sed -n "${BENCH_USAGE}p" "$BENCH_SCRIPT" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

# bench_need CMD HINT: dies unless CMD is on PATH
bench_need() {
    command -v "$1" >/dev/null || bench_die "$1 is needed ($2)"
}

# bench_int_options "OPT:VAR..." ARG...: parses ARGs: -OPT N for each
# OPT:VAR, -h (usage 0), no operands. Each VAR (holding its default unless
# given) must be a positive integer; it is stored in decimal. Usage errors
# exit 2.
bench_int_options() {
    local spec=$1 optstring=: pair opt v OPTIND=1 OPTARG
    local -A var=()
    shift
    for pair in $spec; do
        opt=${pair%%:*}
        optstring+=$opt:
        var[$opt]=${pair#*:}
    done
    while getopts "${optstring}h" opt; do
        case $opt in
            h) usage 0 ;;
            :) bench_err "-$OPTARG needs a value"; usage 2 >&2 ;;
            \?) bench_err "unknown option -$OPTARG"; usage 2 >&2 ;;
            *) printf -v "${var[$opt]}" %s "$OPTARG" ;;
        esac
    done
    shift $((OPTIND - 1))
    (($# == 0)) || { bench_err "unexpected argument: $1"; exit 2; }
    for pair in $spec; do
        opt=${pair%%:*}
        v=${!var[$opt]}
        if ! [[ $v =~ ^[0-9]+$ ]] || ((10#$v < 1)); then
            bench_err "-$opt wants a positive integer, got '$v'"
            exit 2
        fi
        printf -v "${var[$opt]}" %d $((10#$v))
    done
}

# bench_ftvm [--no-build] [CARGO_ARG...]: sets ftvm to the absolute path of
# the binary to measure: $FTVM (relative to the repository) if set, else
# target/release/ftvm, built first with `cargo build --release --quiet
# CARGO_ARG...` unless --no-build is given or there is no cargo.
# shellcheck disable=SC2120 # the arguments are optional
bench_ftvm() {
    local build=1
    if [ "${1-}" = --no-build ]; then
        build=0
        shift
    fi
    if [ -n "${FTVM:-}" ]; then
        ftvm=$FTVM
    else
        ftvm=$BENCH_ROOT/target/release/ftvm
        if ((build)) && command -v cargo >/dev/null; then
            bench_err "cargo build --release (no-op when up to date)"
            cargo build --release --quiet "$@" >&2 || bench_die "the release build failed"
        elif ((build)); then
            bench_err "no cargo: using $ftvm as it is"
        fi
    fi
    [ -x "$ftvm" ] || bench_die "$ftvm not found or not executable (build with cargo build --release, or set FTVM)"
    ftvm=$(cd "$(dirname "$ftvm")" && pwd)/$(basename "$ftvm")
}

# bench_workdir: makes the work directory $work, removed on exit (kept, and
# said so, when BENCH_KEEP=1) after bench_on_exit, if the caller defines it,
# has run; the exit status stays. SIGINT exits 130, SIGTERM 143.
bench_workdir() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/ftvm-bench.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
# shellcheck disable=SC2317 # run by the EXIT trap
bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if declare -F bench_on_exit >/dev/null; then bench_on_exit || true; fi
    if [ "${BENCH_KEEP:-0}" = 1 ]; then bench_err "files kept in $work"; else rm -rf -- "$work"; fi
    exit "$rc"
}
