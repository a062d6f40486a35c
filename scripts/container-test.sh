#!/usr/bin/env bash
# The container test CI runs: builds both Dockerfiles for real, runs the images locked down on sample-images/, and
# checks their predictions row by row against the same model run outside a container; then checks debug.sh runs
# an edited checkout without a rebuild. Installs what it needs (podman, runc, debootstrap) on a fresh machine.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/container-test.sh [--keep]

Builds Dockerfile.cpu and Dockerfile with podman, without network access inside the builds: Python packages come
from a local wheelhouse, the base images are local stand-ins (Debian bookworm's Python 3.11 for python:3.11-slim,
and the same with torch and torchvision for pytorch/pytorch). Then it runs the images with scripts/run.sh's
hardened flags on sample-images/ and compares predictions.csv with 'python entrypoint.py sample-images OUT' run
on this machine; checks the hardening from inside a container, SIGTERM, a build that names a missing checkpoint,
and that scripts/debug.sh runs an edited copy of the checkout without a rebuild. Prints each step's time.

Cached between runs (so a re-run with unchanged requirements takes a few minutes): the base images and build
layers in podman's storage, and the wheelhouse and engine settings in \$CONTAINER_TEST_CACHE
(default /var/cache/harness-container-test).

  --keep       keep the temporary folder (outputs, logs, the edited copy) and print where it is
  -h, --help   this text

Needs: root (apt-get install podman runc debootstrap, when missing), Debian's and PyPI's package servers on the
first run, and this checkout's Python environment (pip install -e '.[dev]') for the run outside a container.
Environment: PYTHON (default python3), CONTAINER_TEST_CACHE, DEBIAN_MIRROR (default http://deb.debian.org/debian).
EOF
}

keep=false
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --keep) keep=true ;;
    *) usage_error "unknown argument '$1'" ;;
    esac
    shift
done

PYTHON=${PYTHON:-python3}
CACHE=${CONTAINER_TEST_CACHE:-/var/cache/harness-container-test}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PREFIX=localhost/harness-ci
BASE=$PREFIX/bookworm-python:3.11 # stands in for python:3.11-slim
CPU_IMAGE=$PREFIX/harness:cpu
GPU_IMAGE=$PREFIX/harness:gpu
WHEELS=$CACHE/wheelhouse
SAMPLES=$REPO_ROOT/sample-images

# The versions the Dockerfiles pin: the wheelhouse and the torch stand-in follow them.
dockerfile_default() { # FILE ARG -> the ARG's default value in FILE
    sed -n "s/^ARG $2=//p" "$REPO_ROOT/$1" | head -n 1
}
TORCH_VERSION=$(dockerfile_default Dockerfile.cpu TORCH_VERSION)
TORCHVISION_VERSION=$(dockerfile_default Dockerfile.cpu TORCHVISION_VERSION)
ORT_CPU_VERSION=$(dockerfile_default Dockerfile.cpu ONNXRUNTIME_VERSION)
ORT_GPU_VERSION=$(dockerfile_default Dockerfile ONNXRUNTIME_VERSION)
for value in TORCH_VERSION TORCHVISION_VERSION ORT_CPU_VERSION ORT_GPU_VERSION; do
    [[ -n ${!value} ]] || die "cannot read $value's default from the Dockerfiles"
done
TORCH_BASE=$PREFIX/pytorch-standin:$TORCH_VERSION # stands in for pytorch/pytorch

WORK=$(mktemp -d "${TMPDIR:-/tmp}/container-test.XXXXXX")
SIGTERM_NAME=harness-ci-sigterm-$$
cleanup() {
    local code=$?
    if [[ -n ${ENGINE:-} ]]; then
        "$ENGINE" rm -f "$SIGTERM_NAME" >/dev/null 2>&1 || true
    fi
    if $keep || [[ $code -ne 0 && -n ${CI:-} ]]; then
        note "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# ---- steps, each timed ----

declare -a TIMES=()
CURRENT=""
step() { # NAME COMMAND... : runs the command as one timed step
    CURRENT=$1
    shift
    printf '\n==> %s\n' "$CURRENT" >&2
    local start=$EPOCHREALTIME
    "$@"
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
    local nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    [[ $nofile == unlimited || $nofile -gt 4096 ]] && nofile=4096
    [[ $nproc == unlimited || $nproc -gt 4096 ]] && nproc=4096
    mkdir -p "$CACHE"
    cat >"$CACHE/containers.conf" <<EOF
# Written by scripts/container-test.sh; read through CONTAINERS_CONF by that script only.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF=$CACHE/containers.conf
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

make_wheelhouse() {
    local list=$WORK/wheelhouse-requirements.txt
    {
        "$PYTHON" -c "import tomllib, sys; print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" \
            "$REPO_ROOT/pyproject.toml"
        [[ ! -f $REPO_ROOT/model/requirements.txt ]] || cat "$REPO_ROOT/model/requirements.txt"
        printf '%s\n' "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
            "onnxruntime==$ORT_CPU_VERSION" "onnxruntime-gpu==$ORT_GPU_VERSION"
    } >"$list" || fail "cannot read the dependencies from pyproject.toml with $PYTHON (needs Python >= 3.11)"
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
        -r "$list" || fail "pip download into $WHEELS failed"
    printf '%s\n' "$stamp" >"$WHEELS/.complete"
    note "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
}

# Builds in these steps have no network: every package comes from the wheelhouse, mounted read-only.
BUILD_OFFLINE=(--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels)
ENGINE_OFFLINE=(--network none --volume "$WHEELS:/wheels:ro")

make_torch_standin() {
    local context=$WORK/torch-standin
    mkdir -p "$context"
    cat >"$context/Containerfile" <<EOF
# A local stand-in for pytorch/pytorch: a Python whose packages are marked externally managed, with torch and
# torchvision installed into it, as in the PyTorch images since 2.10.
FROM $BASE
RUN python3 -m pip install --no-cache-dir --break-system-packages --no-index --find-links /wheels \\
        torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION
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

# FILE TAG BASE_IMAGE: scripts/build.sh, offline, then the tag's previous image removed if the build replaced it.
build_image() {
    local file=$1 tag=$2 base=$3 before after
    before=$(image_id "$tag")
    "$REPO_ROOT/scripts/build.sh" -f "$file" -t "$tag" --base-image "$base" "${BUILD_OFFLINE[@]}" \
        -- "${ENGINE_OFFLINE[@]}" || fail "scripts/build.sh -f $file failed"
    after=$(image_id "$tag")
    if [[ -n $before && $before != "$after" ]]; then
        "$ENGINE" rmi "$before" >/dev/null 2>&1 || true
    fi
}

# A build that names a checkpoint missing from model/ must stop in the first stage, with a message saying so.
build_missing_checkpoint() {
    local log=$WORK/missing-checkpoint.log start=$SECONDS
    if "$ENGINE" build -f "$REPO_ROOT/Dockerfile.cpu" --build-arg BASE_IMAGE="$BASE" \
        --build-arg MODEL_CHECKPOINT=no-such-weights.pth "${BUILD_OFFLINE[@]}" "${ENGINE_OFFLINE[@]}" \
        "$REPO_ROOT" >"$log" 2>&1; then
        fail "the build with MODEL_CHECKPOINT=no-such-weights.pth succeeded"
    fi
    grep -q "MODEL_CHECKPOINT=no-such-weights.pth is not a file in model/" "$log" ||
        { cat "$log" >&2; fail "the failed build did not say which checkpoint is missing"; }
    if grep -q "pip install" "$log"; then
        fail "the build reached pip before failing on the checkpoint"
    fi
    note "the build stopped after $((SECONDS - start)) s: $(grep -m1 '^build error' "$log")"
    local script_log=$WORK/missing-checkpoint-build-sh.log
    if "$REPO_ROOT/scripts/build.sh" --cpu --checkpoint no-such-weights.pth -n >/dev/null 2>"$script_log"; then
        fail "scripts/build.sh accepted a missing checkpoint"
    fi
    grep -q "is not a file in" "$script_log" || fail "scripts/build.sh's message is unclear: $(cat "$script_log")"
}

run_host() {
    (cd "$REPO_ROOT" && "$PYTHON" entrypoint.py sample-images "$WORK/host/predictions.csv" --progress false) ||
        fail "the run outside a container failed (is this checkout installed? pip install -e '.[dev]')"
}

# EXPECTED ACTUAL: same images in the same order, identical class ids, probabilities within float noise.
compare() {
    "$PYTHON" - "$1" "$2" <<'EOF' || fail "$2 differs from $1"
import csv
import sys

expected, actual = ([row for row in csv.reader(open(path, newline=""))] for path in sys.argv[1:3])
problems, worst = [], 0.0
if [row[0] for row in expected] != [row[0] for row in actual]:
    problems.append(f"image names differ: {[r[0] for r in expected]} vs {[r[0] for r in actual]}")
for want, got in zip(expected, actual):
    if want[1::2] != got[1::2]:
        problems.append(f"{want[0]}: class ids {want[1::2]} vs {got[1::2]}")
    else:
        worst = max([worst] + [abs(float(a) - float(b)) for a, b in zip(want[2::2], got[2::2])])
if not expected:
    problems.append("no rows")
if worst > 1e-4:
    problems.append(f"probabilities differ by up to {worst:.2e}")
for problem in problems:
    print("  " + problem, file=sys.stderr)
print(f"  {len(actual)} rows: same images, same class ids; probabilities within {worst:.1e}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
}

json_field() { # FILE KEY: a top-level field of run.json
    "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"
}

run_cpu_image() {
    "$REPO_ROOT/scripts/run.sh" "$CPU_IMAGE" "$SAMPLES" "$WORK/cpu" -- --batch_size 8 --progress false ||
        fail "the CPU image failed (exit $?)"
    compare "$WORK/host/predictions.csv" "$WORK/cpu/predictions.csv"
    [[ $(json_field "$WORK/cpu/run.json" batch_size_total) == 8 ]] ||
        fail "--batch_size 8 after the image name did not reach the harness"
    note "CPU image: $(json_field "$WORK/cpu/run.json" workers) workers, $(json_field "$WORK/cpu/run.json" images_per_s) images/s"
}

run_gpu_image_on_cpu() {
    # No harness options at all: the image's defaults read /input and write /output/predictions.csv.
    "$REPO_ROOT/scripts/run.sh" --gpus none "$GPU_IMAGE" "$SAMPLES" "$WORK/gpu" || fail "the GPU image failed on the CPU"
    compare "$WORK/host/predictions.csv" "$WORK/gpu/predictions.csv"
}

# From inside a container started by run.sh: the flags it promises are in force.
check_hardening() {
    "$REPO_ROOT/scripts/run.sh" --engine-arg --entrypoint=python3 "$CPU_IMAGE" "$SAMPLES" "$WORK/probe" -- -c '
import errno, os, socket

def write_error(path):  # None when the file could be written, else the errno
    try:
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        return None
    except OSError as error:
        return error.errno

def writable(path):
    return write_error(path) is None

status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
shm = os.statvfs("/dev/shm")
checks = {
    "runs as a non-root user": os.getuid() != 0,
    "root filesystem read-only": write_error("/workspace/probe") == write_error("/probe") == errno.EROFS,
    "/input read-only": write_error("/input/probe") == errno.EROFS,
    "/output writable": writable("/output/probe"),
    "/tmp writable": writable("/tmp/probe"),
    "/dev/shm writable, 2 GiB": writable("/dev/shm/probe") and shm.f_blocks * shm.f_frsize == 2 * 2**30,
    "no capabilities": int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0,
    "no-new-privileges": status.get("NoNewPrivs", "").strip() == "1",
    "no network but loopback": [name for _, name in socket.if_nameindex()] == ["lo"],
}
for name, ok in checks.items():
    print(("  ok    " if ok else "  FAIL  ") + name)
raise SystemExit(0 if all(checks.values()) else 1)
' || fail "the container is not locked down as scripts/run.sh promises (see FAIL above)"
}

# docker stop sends SIGTERM: the harness must get it (exec-form entrypoint), stop, and keep the finished rows in
# predictions.csv.partial. At 1024 px the model is 20 times slower, so the run cannot end before the stop.
check_sigterm() {
    local input=$WORK/many code=0
    mkdir -p "$input"
    for copy in 1 2 3; do
        for image in "$SAMPLES"/*.png "$SAMPLES"/*.jpg; do
            cp "$image" "$input/${copy}_${image##*/}"
        done
    done
    "$REPO_ROOT/scripts/run.sh" --name "$SIGTERM_NAME" "$CPU_IMAGE" "$input" "$WORK/sigterm" -- \
        --progress false --batch_size 4 --workers 1 --input-size 1024 --resize-size 1024 >"$WORK/sigterm.log" 2>&1 &
    local pid=$!
    for _ in $(seq 240); do
        [[ ! -e $WORK/sigterm/predictions.csv.partial ]] || break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    [[ -e $WORK/sigterm/predictions.csv.partial ]] || {
        cat "$WORK/sigterm.log" >&2
        fail "the run never started classifying"
    }
    sleep 3
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/sigterm.log" >&2; fail "the run ended before it could be stopped"; }
    "$ENGINE" stop --time 30 "$SIGTERM_NAME" >/dev/null || fail "$ENGINE stop failed"
    wait "$pid" || code=$?
    [[ $code -eq 130 ]] || { cat "$WORK/sigterm.log" >&2; fail "after SIGTERM the exit code was $code, not 130"; }
    grep -q "harness: terminated" "$WORK/sigterm.log" || fail "the harness did not report the SIGTERM"
    [[ -e $WORK/sigterm/predictions.csv.partial ]] || fail "the stopped run left no predictions.csv.partial"
    [[ ! -e $WORK/sigterm/predictions.csv ]] || fail "a stopped run left a predictions.csv"
    note "stopped with exit code 130; $(wc -l <"$WORK/sigterm/predictions.csv.partial") finished rows kept in predictions.csv.partial"
}

# debug.sh on an edited copy of the checkout: the edit shows without a rebuild, and the image is unchanged.
check_debug() {
    local copy=$WORK/checkout marker before
    mkdir -p "$copy"
    if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
            tar -C "$REPO_ROOT" --null -T - -c | tar -C "$copy" -x
    else
        tar --exclude=.git -C "$REPO_ROOT" -c . | tar -C "$copy" -x
    fi
    marker="0.0.0+debug$$"
    sed -i "s/^__version__ = .*/__version__ = \"$marker\"/" "$copy/harness/__init__.py"
    grep -q "$marker" "$copy/harness/__init__.py" || fail "could not edit the copy's harness/__init__.py"
    before=$(image_id "$CPU_IMAGE")
    "$REPO_ROOT/scripts/debug.sh" --repo "$copy" "$CPU_IMAGE" "$SAMPLES" "$WORK/debug" -- --progress false ||
        fail "debug.sh failed"
    [[ $(json_field "$WORK/debug/run.json" harness_version) == "$marker" ]] ||
        fail "debug.sh ran the image's code, not the edited copy's (run.json says $(json_field "$WORK/debug/run.json" harness_version))"
    [[ $(json_field "$WORK/cpu/run.json" harness_version) != "$marker" ]] || fail "the plain run saw the edit too"
    [[ $(image_id "$CPU_IMAGE") == "$before" ]] || fail "the image changed"
    compare "$WORK/host/predictions.csv" "$WORK/debug/predictions.csv"
    note "the edited copy ran (harness_version $marker) from the same image, no rebuild"
}

# save.sh's archive loads back as the same image.
check_save() {
    local archive=$WORK/base.tar.gz loaded
    "$REPO_ROOT/scripts/save.sh" -o "$archive" --level 1 "$BASE" || fail "save.sh failed"
    loaded=$(gunzip -c "$archive" | "$ENGINE" load 2>&1) || fail "the archive does not load: $loaded"
    [[ $loaded == *"Loaded image: $BASE"* ]] || fail "the archive loaded as something else: $loaded"
    [[ $(image_id "$BASE") == "$(gunzip -c "$archive" | tar -xO manifest.json | "$PYTHON" -c \
        'import json, sys; print(json.load(sys.stdin)[0]["Config"].split("/")[-1].removesuffix(".json"))')" ]] ||
        fail "the archive holds another image than $BASE"
}

report_sizes() {
    local image
    for image in "$BASE" "$TORCH_BASE" "$CPU_IMAGE" "$GPU_IMAGE"; do
        printf '  %-45s %s\n' "$image" "$("$ENGINE" image inspect --format '{{.Size}}' "$image" |
            awk '{ printf "%.2f GB", $1 / 1e9 }')" >&2
    done
}

# ---- the test ----

total=$EPOCHREALTIME
step "install podman, runc, debootstrap" install_tools
step "engine settings" configure_engine
step "base image (debootstrap, when absent)" make_base
step "wheelhouse" make_wheelhouse
step "torch stand-in for pytorch/pytorch" make_torch_standin
step "build Dockerfile.cpu" build_image Dockerfile.cpu "$CPU_IMAGE" "$BASE"
step "build Dockerfile (GPU) on the stand-in" build_image Dockerfile "$GPU_IMAGE" "$TORCH_BASE"
step "build refuses a missing checkpoint" build_missing_checkpoint
step "run outside a container" run_host
step "run the CPU image (hardened)" run_cpu_image
step "run the GPU image on the CPU (hardened)" run_gpu_image_on_cpu
step "hardening seen from inside" check_hardening
step "SIGTERM reaches the harness" check_sigterm
step "debug.sh runs an edited copy" check_debug
step "save.sh archive loads back" check_save
CURRENT="summary"
printf '\nImage sizes:\n' >&2
report_sizes
printf '\nStep times:\n' >&2
printf '%s\n' "${TIMES[@]}" >&2
printf '%8s s  total\n' "$(awk -v a="$total" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" >&2
printf 'container test: all checks passed\n' >&2
