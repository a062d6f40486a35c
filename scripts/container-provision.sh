#!/usr/bin/env bash
# Provisioning for the container tests (tests/test_container.py, run with `pytest -m container`): installs podman,
# runc and debootstrap on a fresh machine, makes local stand-ins for the base images and a wheelhouse, and builds
# both Dockerfiles for real, offline. The tests then run the images; this script only builds them.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/container-provision.sh [--env-file FILE] [--keep]

Builds Dockerfile.cpu and Dockerfile with podman, without network access inside the builds: Python packages come
from a local wheelhouse, the base images are local stand-ins (Debian bookworm's Python 3.11 for python:3.11-slim,
and the same with torch and torchvision for pytorch/pytorch). Prints each step's time and the images' sizes on
stderr, and on stdout what the container tests need, as KEY=VALUE lines: CONTAINER_ENGINE and CONTAINERS_CONF
(the engine and its settings, for scripts/run.sh and the other scripts), BASE_IMAGE, TORCH_BASE_IMAGE, CPU_IMAGE,
GPU_IMAGE and WHEELHOUSE. The tests themselves: python3 -m pytest -m container (they run this script first).

Cached between runs (so a re-run with unchanged requirements takes seconds): the base images and build
layers in podman's storage, and the wheelhouse and engine settings in \$CONTAINER_TEST_CACHE
(default /var/cache/harness-container-test).

  --env-file FILE  also write the KEY=VALUE lines to FILE
  --keep           keep the temporary folder (logs, the torch stand-in's build context) and print where it is
  -h, --help       this text

Needs: root (apt-get install podman runc debootstrap, when missing), and Debian's and PyPI's package servers on
the first run. Environment: PYTHON (default python3; >= 3.11, for tomllib and pip download), CONTAINER_TEST_CACHE,
DEBIAN_MIRROR (default http://deb.debian.org/debian).
EOF
}

keep=false
env_file=""
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --env-file)
        need_value "$@"
        env_file=$2
        shift
        ;;
    --keep) keep=true ;;
    *) usage_error "unknown argument '$1'" ;;
    esac
    shift
done

PYTHON=${PYTHON:-python3}
CACHE=$OFFLINE_CACHE # scripts/lib.sh names what this script makes: build.sh --offline builds on it too
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=$OFFLINE_BASE # stands in for python:3.11-slim
CPU_IMAGE=$OFFLINE_PREFIX/harness:cpu
GPU_IMAGE=$OFFLINE_PREFIX/harness:gpu
WHEELS=$OFFLINE_WHEELS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/container-provision.XXXXXX")
cleanup() {
    local code=$?
    if $keep || [[ $code -ne 0 && -n ${CI:-} ]]; then
        note "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# What the images install: the lock's versions (constraints.txt), read through the script both Dockerfiles run.
LISTS=$WORK/lists
"$PYTHON" "$REPO_ROOT/scripts/image-requirements.py" --root "$REPO_ROOT" --out "$LISTS" --extra onnx --extra onnx-gpu ||
    die "cannot write the images' pip files with $PYTHON (needs Python >= 3.11)"
TORCH_VERSION=$(sed -n 's/^torch==//p' "$LISTS/torch.txt")
[[ -n $TORCH_VERSION ]] || die "no torch version in the lock (constraints.txt)"
TORCH_BASE=$(offline_torch_base "$TORCH_VERSION") # stands in for pytorch/pytorch

# ---- steps, each timed ----

declare -a TIMES=()
CURRENT=""
step() { # NAME COMMAND... : runs the command as one timed step, its output on stderr (stdout is for print_env)
    CURRENT=$1
    shift
    printf '\n==> %s\n' "$CURRENT" >&2
    local start=$EPOCHREALTIME
    "$@" >&2
    local took
    took=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    TIMES+=("$(printf '%8s s  %s' "$took" "$CURRENT")")
    printf '<== %s: %s s\n' "$CURRENT" "$took" >&2
}

fail() {
    printf '%s: FAILED in step "%s": %s\n' "$SCRIPT_NAME" "$CURRENT" "$*" >&2
    exit 1
}

install_tools() {
    local missing=()
    for tool in podman runc debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        note "podman, runc and debootstrap are installed"
        return
    fi
    [[ $(id -u) -eq 0 ]] || fail "${missing[*]} missing and not root: run as root, or install them (apt-get install -y podman runc debootstrap)"
    command -v apt-get >/dev/null 2>&1 || fail "${missing[*]} missing and no apt-get here: install podman, runc and debootstrap"
    note "installing podman runc debootstrap"
    apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null ||
        fail "apt-get install podman runc debootstrap failed"
}

# Engine settings of our own, through CONTAINERS_CONF, so the system's files stay as they are: runc (crun refuses
# hybrid cgroups), cgroupfs and file events (no systemd here), and default ulimits no higher than the hard limits
# (raising them is not permitted here).
configure_engine() {
    [[ $(id -u) -eq 0 ]] || fail "run as root: the test uses rootful podman (builds mount the wheelhouse, runs chown outputs)"
    mkdir -p "$CACHE"
    cat >"$OFFLINE_CONF" <<EOF
# Written by scripts/container-provision.sh; read through CONTAINERS_CONF by it, tests/test_container.py and
# scripts/build.sh --offline.
[containers]
$(default_ulimits)

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF=$OFFLINE_CONF
    export CONTAINER_ENGINE=podman
    pick_engine
    "$ENGINE" info >/dev/null || fail "podman does not work here (podman info failed; settings in $CONTAINERS_CONF)"
    note "podman $("$ENGINE" version --format '{{.Client.Version}}'), settings in $CONTAINERS_CONF"
}

make_base() {
    if "$ENGINE" image exists "$BASE"; then
        note "$BASE is there"
        return
    fi
    local rootfs=$CACHE/rootfs.partial
    rm -rf "$rootfs"
    note "debootstrap bookworm (python3, pip) from $MIRROR"
    debootstrap --variant=minbase --include=python3,python3-pip,passwd bookworm "$rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 20 "$WORK/debootstrap.log" >&2
        fail "debootstrap failed (log above)"
    }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    tar -C "$rootfs" -c . | "$ENGINE" import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null ||
        fail "podman import of the debootstrap tree failed"
    rm -rf "$rootfs"
}

# What the two builds install: the harness's dependencies with the extra each Dockerfile adds (onnx: onnxruntime for
# the CPU image, onnx-gpu: onnxruntime-gpu for the GPU one), the model's and torch, all at the lock's versions.
make_wheelhouse() {
    local list=$WORK/wheelhouse-requirements.txt
    cat "$LISTS/harness.txt" "$LISTS/model.txt" "$LISTS/torch.txt" "$LISTS/constraints.txt" >"$list"
    local stamp
    stamp=$(sha256sum "$list" | cut -d' ' -f1)
    if [[ -f $WHEELS/.complete && $(cat "$WHEELS/.complete") == "$stamp" ]]; then
        note "wheelhouse $WHEELS is up to date"
        return
    fi
    mkdir -p "$WHEELS"
    rm -f "$WHEELS/.complete"
    # For the images' Python, whatever runs this: CPython 3.11 on x86-64 glibc 2.36 (bookworm), which takes every
    # manylinux tag up to 2.36 (pip wants each named).
    local platforms=(--platform manylinux2014_x86_64) version
    for version in $(seq 5 36); do
        platforms+=(--platform "manylinux_2_${version}_x86_64")
    done
    "$PYTHON" -m pip download -qq --dest "$WHEELS" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
        -r "$LISTS/harness.txt" -r "$LISTS/model.txt" -r "$LISTS/torch.txt" -c "$LISTS/constraints.txt" ||
        fail "pip download into $WHEELS failed"
    printf '%s\n' "$stamp" >"$WHEELS/.complete"
    note "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
}

# Builds in these steps have no network: every package comes from the wheelhouse, mounted read-only (build.sh
# --offline does the same).
ENGINE_OFFLINE=(--network none --volume "$WHEELS:/wheels:ro")

make_torch_standin() {
    local context=$WORK/torch-standin
    mkdir -p "$context"
    cat >"$context/Containerfile" <<EOF
# A local stand-in for pytorch/pytorch: a Python whose packages are marked externally managed, with torch and
# torchvision installed into it, as in the PyTorch images since 2.10.
FROM $BASE
RUN python3 -m pip install --no-cache-dir --break-system-packages --no-index --find-links /wheels \\
        $(tr '\n' ' ' <"$LISTS/torch.txt")
CMD ["/bin/bash"]
EOF
    "$ENGINE" build --layers "${ENGINE_OFFLINE[@]}" -t "$TORCH_BASE" "$context" >"$WORK/torch-standin.log" 2>&1 || {
        tail -n 30 "$WORK/torch-standin.log" >&2
        fail "building the torch stand-in failed (log above)"
    }
}

image_id() {
    "$ENGINE" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true
}

# FILE TAG BASE_IMAGE: scripts/build.sh --offline, then the tag's previous image removed if the build replaced it.
build_image() {
    local file=$1 tag=$2 base=$3 before after
    before=$(image_id "$tag")
    "$REPO_ROOT/scripts/build.sh" -f "$file" -t "$tag" --base-image "$base" --offline ||
        fail "scripts/build.sh -f $file --offline failed"
    after=$(image_id "$tag")
    if [[ -n $before && $before != "$after" ]]; then
        "$ENGINE" rmi "$before" >/dev/null 2>&1 || true
    fi
}

report_sizes() {
    local image
    for image in "$BASE" "$TORCH_BASE" "$CPU_IMAGE" "$GPU_IMAGE"; do
        printf '  %-45s %s\n' "$image" "$("$ENGINE" image inspect --format '{{.Size}}' "$image" |
            awk '{ printf "%.2f GB", $1 / 1e9 }')" >&2
    done
}

# What the tests need, as KEY=VALUE lines (no value holds a newline).
print_env() {
    printf '%s\n' \
        "CONTAINER_ENGINE=$ENGINE" \
        "CONTAINERS_CONF=$CONTAINERS_CONF" \
        "BASE_IMAGE=$BASE" \
        "TORCH_BASE_IMAGE=$TORCH_BASE" \
        "CPU_IMAGE=$CPU_IMAGE" \
        "GPU_IMAGE=$GPU_IMAGE" \
        "WHEELHOUSE=$WHEELS"
}

# ---- provisioning ----

total=$EPOCHREALTIME
step "install podman, runc, debootstrap" install_tools
step "engine settings" configure_engine
step "base image (debootstrap, when absent)" make_base
step "wheelhouse" make_wheelhouse
step "torch stand-in for pytorch/pytorch" make_torch_standin
step "build Dockerfile.cpu" build_image Dockerfile.cpu "$CPU_IMAGE" "$BASE"
step "build Dockerfile (GPU) on the stand-in" build_image Dockerfile "$GPU_IMAGE" "$TORCH_BASE"
CURRENT="summary"
printf '\nImage sizes:\n' >&2
report_sizes
printf '\nStep times:\n' >&2
printf '%s\n' "${TIMES[@]}" >&2
printf '%8s s  total\n' "$(awk -v a="$total" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" >&2
if [[ -n $env_file ]]; then
    print_env >"$env_file" || fail "cannot write $env_file"
fi
print_env
note "provisioned: both images are built"
