#!/usr/bin/env bash
# Builds the harness image from this checkout: the model in model/, its build arguments, a tag.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/build.sh [options] [-- ENGINE_BUILD_OPTIONS...]

Builds the harness image from this checkout, with the model in model/ built in.

Image:
  --cpu                  build Dockerfile.cpu: CPU builds of torch, for machines without an NVIDIA GPU
  -f, --file FILE        Dockerfile (default, GPU) or Dockerfile.cpu
  -t, --tag TAG          image name (default: harness:gpu, or harness:cpu with Dockerfile.cpu)
  --base-image IMAGE     BASE_IMAGE: the image to build on (default: the Dockerfile's)
  --offline              build with no network, as the container test does: on the local stand-in for the base
                         image and with the packages of the wheelhouse that scripts/container-provision.sh makes
                         (run it once first, as root), with podman and its settings there

Model defaults baked into the image (each can still be changed at run time):
  --class NAME           MODEL_CLASS_NAME: the model class in model/model.py
  --checkpoint FILE      MODEL_CHECKPOINT: a state_dict file in model/ (checked before building)
  --workers N            WORKERS: decoding processes (default: the CPUs the container may use)
  --batch-size N         BATCH_SIZE: images per batch per GPU
  --gpus N               GPUS: GPUs to use (default: all visible)

Package sources (for proxies and air-gapped builds):
  --pip-cert FILE        CA bundle pip trusts: passed as a build secret, PIP_CERT points at it
  --build-arg NAME=VALUE any build argument, repeatable: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
                         PIP_NO_INDEX, PIP_TRUSTED_HOST, TORCH_INDEX_URL (CPU), ONNXRUNTIME_VERSION, ...

  -n, --dry-run          print the build command, run nothing
  -h, --help             this text

Everything after -- goes to the engine's build command as it is (--no-cache, --network host, --pull, ...).
CONTAINER_ENGINE picks docker or podman (default: docker when its engine answers, else podman).

Examples:
  scripts/build.sh --class Model --checkpoint weights.pth -t my-model:gpu
  scripts/build.sh --cpu --offline -t my-model:cpu
  scripts/build.sh --cpu --build-arg PIP_INDEX_URL=https://pypi.example.org/simple \\
      --build-arg TORCH_INDEX_URL=https://pypi.example.org/pytorch-cpu/simple --pip-cert corp-ca.pem
EOF
}

file=Dockerfile
tag=""
base_image=""
offline=false
dry_run=false
pip_cert=""
build_args=()
extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --cpu) file=Dockerfile.cpu ;;
    -f | --file)
        need_value "$@"
        file=$2
        shift
        ;;
    -t | --tag)
        need_value "$@"
        tag=$2
        shift
        ;;
    --base-image)
        need_value "$@"
        base_image=$2
        shift
        ;;
    --offline) offline=true ;;
    --class)
        need_value "$@"
        build_args+=(--build-arg "MODEL_CLASS_NAME=$2")
        shift
        ;;
    --checkpoint)
        need_value "$@"
        checkpoint=$2
        build_args+=(--build-arg "MODEL_CHECKPOINT=$2")
        shift
        ;;
    --workers | --batch-size | --gpus)
        need_value "$@"
        is_count "$2" || usage_error "$1 needs a whole number, not '$2'"
        name=${1#--}
        name=${name//-/_}
        build_args+=(--build-arg "${name^^}=$2")
        shift
        ;;
    --pip-cert)
        need_value "$@"
        pip_cert=$2
        shift
        ;;
    --build-arg)
        need_value "$@"
        [[ $2 == *=* ]] || usage_error "--build-arg needs NAME=VALUE, not '$2'"
        build_args+=(--build-arg "$2")
        shift
        ;;
    -n | --dry-run) dry_run=true ;;
    --)
        shift
        extra=("$@")
        break
        ;;
    *) usage_error "unknown option '$1' (options for the engine go after --)" ;;
    esac
    shift
done

case ${file##*/} in
Dockerfile) default_tag=harness:gpu ;;
Dockerfile.cpu) default_tag=harness:cpu ;;
*) default_tag=harness:latest ;;
esac
tag=${tag:-$default_tag}
[[ $file == /* ]] || file=$REPO_ROOT/$file
[[ -f $file ]] || die "no Dockerfile at $file (use Dockerfile or Dockerfile.cpu)"

# The same check the Dockerfile makes, here before the engine starts: the checkpoint must be a file in model/.
if [[ -n ${checkpoint:-} ]]; then
    name=${checkpoint#/workspace/}
    name=${name#model/}
    if [[ ! -f $REPO_ROOT/model/$name ]]; then
        die "--checkpoint $checkpoint is not a file in $REPO_ROOT/model/. Copy the checkpoint there and name it as" \
            "it is there (e.g. --checkpoint weights.pth)."
    fi
fi

# Offline: what scripts/container-provision.sh made, as its own builds use it (no network inside the build).
if $offline; then
    if [[ -z $base_image ]]; then
        case ${file##*/} in
        Dockerfile.cpu) base_image=$OFFLINE_BASE ;;
        *) base_image=$(offline_torch_base "$(locked_version torch)") ;;
        esac
    fi
    build_args+=(--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels)
    extra=(--network none --volume "$OFFLINE_WHEELS:/wheels:ro" "${extra[@]}")
    export CONTAINER_ENGINE=${CONTAINER_ENGINE:-podman}
    if [[ -z ${CONTAINERS_CONF:-} && -f $OFFLINE_CONF ]]; then
        export CONTAINERS_CONF=$OFFLINE_CONF
    fi
fi
[[ -z $base_image ]] || build_args+=(--build-arg "BASE_IMAGE=$base_image")

secret=()
if [[ -n $pip_cert ]]; then
    [[ -f $pip_cert && -r $pip_cert ]] || die "--pip-cert $pip_cert is not a readable file"
    secret=(--secret "id=pip_cert,src=$(cd "$(dirname "$pip_cert")" && pwd)/$(basename "$pip_cert")")
    build_args+=(--build-arg PIP_CERT=/run/secrets/pip_cert)
fi

# OCI labels: what was built, from which commit, when.
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO_ROOT/harness/__init__.py")
revision=""
if git -C "$REPO_ROOT" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    revision=$(git -C "$REPO_ROOT" rev-parse HEAD)
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        revision+="-dirty"
    fi
fi
labels=(
    --build-arg "VERSION=$version"
    --build-arg "REVISION=$revision"
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
)

if $dry_run; then
    ENGINE=${CONTAINER_ENGINE:-docker}
else
    pick_engine
fi
if $offline && ! $dry_run; then
    [[ $ENGINE_KIND == podman ]] ||
        die "--offline needs podman, which mounts the wheelhouse into the build ($ENGINE cannot); set CONTAINER_ENGINE=podman"
    [[ -f $OFFLINE_WHEELS/.complete ]] ||
        die "--offline: no wheelhouse in $OFFLINE_WHEELS. Run scripts/container-provision.sh first (as root): it makes it."
    "$ENGINE" image exists "$base_image" ||
        die "--offline: no local image $base_image. Run scripts/container-provision.sh first (as root): it makes it."
fi
command=("$ENGINE" build -f "$file" -t "$tag" "${labels[@]}" "${build_args[@]}" "${secret[@]}" "${extra[@]}" "$REPO_ROOT")
if $dry_run; then
    printf '%q ' "${command[@]}"
    printf '\n'
    exit 0
fi
start=$SECONDS
run_shown "${command[@]}" || die "the build failed (the engine's messages are above)"
note "built $tag in $((SECONDS - start)) s; run it with: scripts/run.sh $tag INPUT_DIR OUTPUT_DIR"
