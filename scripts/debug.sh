#!/usr/bin/env bash
# Runs an image with a checkout mounted over /workspace: edits to the code or model/ take effect without a rebuild.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/debug.sh [--repo DIR] [--shell] [run.sh options] IMAGE INPUT_DIR OUTPUT_DIR [-- HARNESS_OPTIONS...]

Like scripts/run.sh (same locked-down container, same options), but with a checkout of the harness (default:
this one, $REPO_ROOT) mounted read-only over /workspace. The image runs the code from /workspace, so changes to
harness/, entrypoint.py and model/ (code, config.yaml, a new checkpoint) take effect at once, without a rebuild.
New Python packages (model/requirements.txt) still need one.

  --repo DIR     the checkout to mount (default: the one this script is in)
  --shell        start bash in the container instead of the harness (needs a terminal)
  -h, --help     this text; scripts/run.sh --help lists the other options
EOF
}

repo=$REPO_ROOT
args=()
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --repo)
        need_value "$@"
        repo=$2
        shift
        ;;
    --shell)
        [[ -t 0 ]] || die "--shell needs a terminal on standard input"
        args+=(--engine-arg --entrypoint=/bin/bash --engine-arg --interactive)
        ;;
    --)
        args+=("$@")
        break
        ;;
    *) args+=("$1") ;;
    esac
    shift
done
[[ -d $repo ]] || die "--repo $repo is not a folder"
[[ -f $repo/entrypoint.py && -d $repo/harness ]] || die "$repo is not a checkout of the harness (no entrypoint.py and harness/)"
exec "$REPO_ROOT/scripts/run.sh" --workspace "$repo" "${args[@]}"
