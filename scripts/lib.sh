# shellcheck shell=bash disable=SC2034  # (the variables set here are for the scripts that source this file)
# Shared by the scripts beside this file: sourced, never run. Each script sets `set -euo pipefail` itself.

SCRIPT_NAME=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE_UID=10001 # the image's user (see the Dockerfiles)

# What scripts/container-provision.sh makes for the container test, and `build.sh --offline` builds on: local
# stand-ins for the base images (podman's storage), a wheelhouse and podman's settings (in OFFLINE_CACHE).
OFFLINE_CACHE=${CONTAINER_TEST_CACHE:-/var/cache/harness-container-test}
OFFLINE_WHEELS=$OFFLINE_CACHE/wheelhouse
OFFLINE_CONF=$OFFLINE_CACHE/containers.conf
OFFLINE_PREFIX=localhost/harness-ci
OFFLINE_BASE=$OFFLINE_PREFIX/bookworm-python:3.11 # stands in for python:3.11-slim

die() {
    printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
    exit 1
}

usage_error() {
    printf '%s: error: %s\nTry: %s --help\n' "$SCRIPT_NAME" "$*" "$0" >&2
    exit 2
}

note() {
    printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

# The value of an option that takes one: `--opt VALUE`; fails clearly when VALUE is missing.
need_value() {
    [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"
}

is_count() {
    [[ $1 =~ ^[0-9]+$ ]]
}

# Sets ENGINE (the command) and ENGINE_KIND (docker or podman): $CONTAINER_ENGINE when set, else docker when a
# Docker engine answers, else podman.
pick_engine() {
    if [[ -n ${CONTAINER_ENGINE:-} ]]; then
        command -v "$CONTAINER_ENGINE" >/dev/null 2>&1 ||
            die "CONTAINER_ENGINE=$CONTAINER_ENGINE is not a command on PATH"
        ENGINE=$CONTAINER_ENGINE
    elif command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
    elif command -v docker >/dev/null 2>&1; then
        die "docker is installed but no Docker engine answers ('docker info' failed), and podman is not installed." \
            "Start the Docker engine, install podman, or set CONTAINER_ENGINE."
    else
        die "no container engine found: install Docker (docs.docker.com/engine/install) or podman," \
            "or set CONTAINER_ENGINE to one on PATH."
    fi
    case ${ENGINE##*/} in
    podman*) ENGINE_KIND=podman ;;
    *) ENGINE_KIND=docker ;;
    esac
}

# Prints a command the way a shell would read it back, then runs it.
run_shown() {
    local shown
    shown=$(printf '%q ' "$@")
    note "+ ${shown% }"
    "$@"
}

# The stand-in for pytorch/pytorch that scripts/container-provision.sh makes: its Python with TORCH_VERSION installed.
offline_torch_base() {
    printf '%s/pytorch-standin:%s\n' "$OFFLINE_PREFIX" "$1"
}

# The version of PACKAGE in the lock (constraints.txt), empty when it has none.
locked_version() {
    sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$REPO_ROOT/constraints.txt" | head -n 1
}

# podman's default_ulimits line, within this machine's hard limits (podman's own defaults may be higher, and raising
# a limit past the hard one is refused where the engine lacks the right: "error setting rlimit").
default_ulimits() {
    local nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    [[ $nofile == unlimited || $nofile -gt 4096 ]] && nofile=4096
    [[ $nproc == unlimited || $nproc -gt 4096 ]] && nproc=4096
    printf 'default_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' "$nofile" "$nofile" "$nproc" "$nproc"
}

# Copies an engine's standard error through as it comes, and after it names the fix of an error it knows. For a
# process substitution (`2> >(explain_engine_errors)`): it outlives the signals that stop a run (Ctrl-C reaches the
# whole process group), so the engine's last messages still come through.
explain_engine_errors() {
    trap '' INT TERM
    local fix
    fix="$SCRIPT_NAME: podman may not raise the container's limits here (rlimit type 7 is open files, 6 processes):"
    fix+=" set CONTAINERS_CONF to a file holding '[containers]' and '$(default_ulimits)'"
    fix+=" (scripts/container-provision.sh writes one: $OFFLINE_CONF)"
    tee >(awk -v fix="$fix" '/error setting rlimit/ { seen = 1 } END { if (seen) print fix }' >&2) >&2
}
