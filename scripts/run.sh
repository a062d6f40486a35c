#!/usr/bin/env bash
# Runs the harness image on a folder of images, the container locked down (see usage).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/run.sh [options] IMAGE INPUT_DIR OUTPUT_DIR [-- HARNESS_OPTIONS...]

Classifies every image in INPUT_DIR (mounted read-only at /input) and writes OUTPUT_DIR/predictions.csv, with
errors.csv and run.json beside it. The container has no network, a read-only root filesystem (only /output, /tmp
and /dev/shm are writable), no capabilities, no-new-privileges, and runs as a non-root user.

  --gpus auto|all|none   auto (default): all GPUs when nvidia-smi lists one, else none
  --shm-size SIZE        /dev/shm, which carries decoded batches from the workers (default 2g)
  --tmp-size SIZE        the /tmp tmpfs (default 1g)
  --memory SIZE          memory limit, e.g. 8g (default: none)
  --cpus N               CPU limit, e.g. 4 (the harness sizes its workers to it)
  --user UID[:GID]       run as this user (default: you; when run as root, the owner of OUTPUT_DIR, or the
                         image's user $IMAGE_UID when root owns it)
  -e, --env NAME=VALUE   set a variable in the container (WORKERS=4, BATCH_SIZE=32, ...); repeatable
  --name NAME            container name
  --workspace DIR        mount DIR read-only over /workspace, so the code and model/ there run (debug.sh)
  --engine-arg ARG       one more option for the engine's run command; repeatable
  -n, --dry-run          print the command, run nothing
  -h, --help             this text

HARNESS_OPTIONS go to the harness as they are (python entrypoint.py --help lists them), e.g. -- --batch_size 32.
The exit code is the harness's (0 success, 2 bad setting, 3 input, 4 model, 5 device, 6 output, 7 failures).
CONTAINER_ENGINE picks docker or podman (default: docker when its engine answers, else podman).
EOF
}

gpus=auto
shm_size=2g
tmp_size=1g
user=""
dry_run=false
workspace=""
options=()
positional=()
harness=()
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --gpus)
        need_value "$@"
        case $2 in auto | all | none) gpus=$2 ;; *) usage_error "--gpus takes auto, all or none, not '$2'" ;; esac
        shift
        ;;
    --shm-size)
        need_value "$@"
        shm_size=$2
        shift
        ;;
    --tmp-size)
        need_value "$@"
        tmp_size=$2
        shift
        ;;
    --memory | --cpus | --name)
        need_value "$@"
        options+=("$1" "$2")
        shift
        ;;
    --user)
        need_value "$@"
        user=$2
        shift
        ;;
    -e | --env)
        need_value "$@"
        [[ $2 == *=* ]] || usage_error "$1 needs NAME=VALUE, not '$2'"
        options+=(--env "$2")
        shift
        ;;
    --workspace)
        need_value "$@"
        workspace=$2
        shift
        ;;
    --engine-arg)
        need_value "$@"
        options+=("$2")
        shift
        ;;
    -n | --dry-run) dry_run=true ;;
    --)
        shift
        harness=("$@")
        break
        ;;
    -*) usage_error "unknown option '$1' (options for the harness go after --)" ;;
    *) positional+=("$1") ;;
    esac
    shift
done
[[ ${#positional[@]} -eq 3 ]] || usage_error "expected IMAGE INPUT_DIR OUTPUT_DIR, got ${#positional[@]} argument(s)"
image=${positional[0]}
input=${positional[1]}
output=${positional[2]}

[[ -d $input ]] || die "input folder $input does not exist"
[[ -r $input && -x $input ]] || die "input folder $input is not readable"
created_output=false
if [[ ! -d $output ]]; then
    [[ ! -e $output ]] || die "output $output exists and is not a folder (give the folder; predictions.csv goes in it)"
    $dry_run || mkdir -p "$output" || die "cannot create output folder $output"
    created_output=true
fi
input=$(cd "$input" && pwd)
output=$(cd "$output" 2>/dev/null && pwd || printf '%s' "$output")
for path in "$input" "$output" ${workspace:+"$workspace"}; do
    [[ $path != *:* ]] || die "$path has a ':' in it, which the engine's -v option cannot take: use another folder"
done

if $dry_run; then
    ENGINE=${CONTAINER_ENGINE:-docker}
    ENGINE_KIND=$([[ ${ENGINE##*/} == podman* ]] && echo podman || echo docker)
else
    pick_engine
fi

# Who the harness runs as, so that it can write OUTPUT_DIR and the files there belong to the right person.
if [[ -z $user ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        user="$(id -u):$(id -g)"
        # Rootless podman maps container users into a sub-range; keep-id maps this user to itself.
        [[ $ENGINE_KIND != podman ]] || options+=(--userns keep-id)
    elif ! $dry_run && [[ $(stat -c %u "$output") -ne 0 ]]; then
        user=$(stat -c %u:%g "$output")
    elif $created_output && ! $dry_run; then
        chown "$IMAGE_UID:$IMAGE_UID" "$output"
    elif ! $dry_run && [[ $(($(stat -c '0%a' "$output") & 2)) -eq 0 ]]; then
        die "$output belongs to root and the image's user (uid $IMAGE_UID) cannot write it. Use a new folder" \
            "(run.sh creates it for that user), 'chown $IMAGE_UID $output', or --user UID."
    fi
fi
[[ -z $user ]] || options+=(--user "$user")

if [[ $gpus == auto ]]; then
    gpus=none
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        gpus=all
    fi
fi
if [[ $gpus == all ]]; then
    if [[ $ENGINE_KIND == podman ]]; then
        options+=(--device nvidia.com/gpu=all) # CDI: nvidia-ctk cdi generate (docs/docker.md)
    else
        options+=(--gpus all)
    fi
fi

if [[ -n $workspace ]]; then
    [[ -f $workspace/entrypoint.py ]] || die "--workspace $workspace has no entrypoint.py: give a checkout of the harness"
    options+=(--volume "$(cd "$workspace" && pwd):/workspace:ro")
fi
# Progress bar and Ctrl-C behave as on a terminal when there is one.
[[ ! -t 0 || ! -t 2 ]] || options+=(--tty)

command=(
    "$ENGINE" run --rm
    --network none
    --read-only
    --tmpfs "/tmp:rw,nosuid,nodev,size=$tmp_size"
    --shm-size "$shm_size"
    --cap-drop ALL
    --security-opt no-new-privileges
    --volume "$input:/input:ro"
    --volume "$output:/output"
    "${options[@]}"
    "$image"
    "${harness[@]}"
)
if $dry_run; then
    printf '%q ' "${command[@]}"
    printf '\n'
    exit 0
fi
shown=$(printf '%q ' "${command[@]}")
note "+ ${shown% }"
if [[ $ENGINE_KIND == podman ]]; then
    exec "${command[@]}" 2> >(explain_engine_errors) # its messages as they come, then the fix of one it knows
fi
exec "${command[@]}"
