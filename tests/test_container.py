"""The images built and run for real: `pytest -m container` (CI runs it through `.ci/run`).

One session fixture runs scripts/container-provision.sh, which builds both Dockerfiles with podman, offline, and
shows its output as it goes: about 10 minutes on a fresh 2-core machine (it installs podman, makes the base images
and a wheelhouse), about 10 seconds after that. Each test below then runs the images as a user would, through
scripts/run.sh (hardened), debug.sh and save.sh, and checks one promise.
"""

from __future__ import annotations

import contextlib
import gzip
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, SAMPLES, compare_predictions, env_without_build_args

SCRIPTS = REPO / "scripts"
PROVISION = SCRIPTS / "container-provision.sh"
PROVISION_TIME_LIMIT_S = 45 * 60
COMMAND_TIME_LIMIT_S = 10 * 60  # any one run of an image or the engine
BUILD_TOLERANCE = 1e-4  # another build of torch (the CPU index's, the base image's) may round further apart


def container_test(test: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.container(pytest.mark.slow(test))


# ---- the images, built once per session ----


@dataclass(frozen=True)
class Images:
    """What scripts/container-provision.sh built, and how to reach it."""

    env: dict[str, str]  # this process's environment plus CONTAINER_ENGINE and CONTAINERS_CONF
    base: str  # the stand-in for python:3.11-slim
    torch_base: str  # the stand-in for pytorch/pytorch
    cpu: str  # Dockerfile.cpu built on `base`
    gpu: str  # Dockerfile built on `torch_base`
    wheelhouse: Path

    @property
    def engine(self) -> str:
        return self.env["CONTAINER_ENGINE"]

    def run(self, *command: str | Path, timeout: float = COMMAND_TIME_LIMIT_S) -> subprocess.CompletedProcess[str]:
        """A command with the engine's settings, its output captured."""
        return subprocess.run(
            [str(part) for part in command],
            env=self.env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )

    def script(self, name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return self.run("bash", SCRIPTS / name, *args)

    def engine_run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return self.run(self.engine, *args)

    def image_id(self, image: str) -> str:
        result = self.engine_run("image", "inspect", "--format", "{{.Id}}", image)
        assert result.returncode == 0, f"no image {image}: {result.stderr}"
        return result.stdout.strip()


def why_not_here() -> str | None:
    """Why the container tests cannot run here, or None. In CI they always run, so a missing tool fails them."""
    if os.environ.get("CI"):
        return None
    if os.geteuid() != 0:
        return f"{PROVISION.relative_to(REPO)} needs root (it installs podman and runs it rootful)"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "neither podman nor apt-get to install it"
    return None


def stream(command: list[str], env: dict[str, str], limit_s: float) -> tuple[int, list[str], bool]:
    """Runs the command with its output shown as it comes: (exit code, the lines, whether it ran past limit_s)."""
    lines: list[str] = []
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        start_new_session=True,  # its own process group, so a time-out stops podman too
    )
    assert process.stdout is not None
    watchdog = threading.Timer(limit_s, os.killpg, (process.pid, signal.SIGTERM))
    watchdog.start()
    try:
        for line in process.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        code = process.wait()
    finally:
        timed_out = watchdog.finished.is_set()  # set when it fired; checked before cancel() sets it too
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return code, lines, timed_out


@pytest.fixture(scope="session")
def images(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Runs scripts/container-provision.sh once per session, its output on the terminal as it goes."""
    reason = why_not_here()
    if reason:
        pytest.skip(reason)
    env_file = tmp_path_factory.mktemp("provision") / "images.env"
    # What capsys.disabled() does, for a session fixture (capsys is per test): the build's progress and the step
    # times belong in CI's log as they happen.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n--- {PROVISION.relative_to(REPO)} (the container tests' images) ---", flush=True)
        code, lines, timed_out = stream(
            ["bash", str(PROVISION), "--env-file", str(env_file)],
            env={**os.environ, "PYTHON": sys.executable},
            limit_s=PROVISION_TIME_LIMIT_S,
        )
    tail = "".join(lines[-40:])
    if timed_out:
        pytest.fail(f"{PROVISION.name} ran past {PROVISION_TIME_LIMIT_S} s and was stopped:\n{tail}", pytrace=False)
    if code != 0 or not env_file.is_file():
        pytest.fail(f"{PROVISION.name} exited {code}:\n{tail}", pytrace=False)
    values = dict(line.split("=", 1) for line in env_file.read_text(encoding="utf-8").splitlines() if "=" in line)
    return Images(
        env={
            **env_without_build_args(),
            "CONTAINER_ENGINE": values["CONTAINER_ENGINE"],
            "CONTAINERS_CONF": values["CONTAINERS_CONF"],
        },
        base=values["BASE_IMAGE"],
        torch_base=values["TORCH_BASE_IMAGE"],
        cpu=values["CPU_IMAGE"],
        gpu=values["GPU_IMAGE"],
        wheelhouse=Path(values["WHEELHOUSE"]),
    )


@pytest.fixture(scope="session")
def host_predictions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """predictions.csv of `python3 entrypoint.py sample-images OUT` on this machine: what the images must match."""
    output = tmp_path_factory.mktemp("host") / "predictions.csv"
    result = subprocess.run(
        [sys.executable, "entrypoint.py", "sample-images", str(output), "--progress", "false"],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=COMMAND_TIME_LIMIT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"the run outside a container failed (is this checkout installed? pip install -e '.[dev]'):\n{result.stderr}"
    )
    return output


def failed(what: str, result: subprocess.CompletedProcess[str]) -> str:
    return f"{what} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


def run_json(output: Path) -> dict:
    return json.loads((output / "run.json").read_text(encoding="utf-8"))


# ---- the tests ----


@container_test
def test_images_match_a_run_outside_a_container(images: Images, host_predictions: Path, tmp_path: Path) -> None:
    """Both images, hardened, give the host's predictions: same keys, same class ids, confidences within 1e-4."""
    cpu = tmp_path / "cpu"
    result = images.script("run.sh", images.cpu, SAMPLES, cpu, "--", "--batch_size", "8", "--progress", "false")
    assert result.returncode == 0, failed("the CPU image", result)
    problems = compare_predictions(host_predictions, cpu / "predictions.csv", BUILD_TOLERANCE)
    assert not problems, "the CPU image's predictions differ from the host run's:\n" + "\n".join(problems)
    assert run_json(cpu)["batch_size_total"] == 8, "--batch_size 8 after the image name did not reach the harness"
    assert run_json(cpu)["confinement"]["state"] == "filesystem+network", run_json(cpu)["confinement"]

    # The GPU image on the CPU, with no harness options at all: its defaults read /input, write /output.
    gpu = tmp_path / "gpu"
    result = images.script("run.sh", "--gpus", "none", images.gpu, SAMPLES, gpu)
    assert result.returncode == 0, failed("the GPU image on the CPU", result)
    problems = compare_predictions(host_predictions, gpu / "predictions.csv", BUILD_TOLERANCE)
    assert not problems, "the GPU image's predictions differ from the host run's:\n" + "\n".join(problems)
    assert run_json(gpu)["confinement"]["state"] == "filesystem+network", run_json(gpu)["confinement"]


def hardening_probe() -> dict[str, bool]:
    """Runs inside the container (its source goes in with python3 -c): each of scripts/run.sh's promises, by name."""
    import errno
    import os
    import socket
    from pathlib import Path

    def write_error(path: str) -> int | None:  # None when the file could be written, else the errno
        try:
            Path(path).write_text("x")
            Path(path).unlink()
        except OSError as error:
            return error.errno
        return None

    lines = Path("/proc/self/status").read_text().splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    shm = os.statvfs("/dev/shm")
    return {
        "runs as a non-root user": os.getuid() != 0,
        "root filesystem read-only": write_error("/workspace/probe") == write_error("/probe") == errno.EROFS,
        "/input read-only": write_error("/input/probe") == errno.EROFS,
        "/output writable": write_error("/output/probe") is None,
        "/tmp writable": write_error("/tmp/probe") is None,
        "/dev/shm writable, 2 GiB": write_error("/dev/shm/probe") is None and shm.f_blocks * shm.f_frsize == 2 << 30,
        "no capabilities": int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0,
        "no-new-privileges": status.get("NoNewPrivs", "").strip() == "1",
        "no network but loopback": [name for _, name in socket.if_nameindex()] == ["lo"],
    }


@container_test
def test_run_sh_locks_the_container_down(images: Images, tmp_path: Path) -> None:
    """Seen from inside a container that scripts/run.sh started: every flag it promises is in force."""
    program = f"{inspect.getsource(hardening_probe)}\nimport json\nprint(json.dumps(hardening_probe()))\n"
    result = images.script(
        "run.sh", "--engine-arg", "--entrypoint=python3", images.cpu, SAMPLES, tmp_path / "out", "--", "-c", program
    )
    assert result.returncode == 0, failed("the probe", result)
    checks = json.loads(result.stdout.strip().splitlines()[-1])
    assert checks, "the probe reported nothing"
    broken = [name for name, ok in checks.items() if not ok]
    assert not broken, "the container is not locked down as scripts/run.sh promises: " + "; ".join(broken)


@container_test
def test_sigterm_stops_the_run_and_keeps_its_rows(images: Images, tmp_path: Path) -> None:
    """`docker stop` sends SIGTERM: the harness (PID 1, exec form) stops, exits 130, keeps the finished rows."""
    many = tmp_path / "many"
    many.mkdir()
    for copy in (1, 2, 3):
        for image in sorted(SAMPLES.glob("*.png")) + sorted(SAMPLES.glob("*.jpg")):
            shutil.copy(image, many / f"{copy}_{image.name}")
    output, log = tmp_path / "out", tmp_path / "run.log"
    partial = output / "predictions.csv.partial"
    name = f"harness-ci-sigterm-{os.getpid()}"
    # At 1024 px the model is 20 times slower, so the run cannot end before the stop.
    command = ["bash", str(SCRIPTS / "run.sh"), "--name", name, images.cpu, str(many), str(output), "--"]
    command += ["--progress", "false", "--batch_size", "4", "--workers", "1"]
    command += ["--input-size", "1024", "--resize-size", "1024"]
    with open(log, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=images.env)
    try:
        deadline = time.monotonic() + 120
        while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert partial.exists(), f"the run never started classifying:\n{log.read_text(errors='replace')}"
        time.sleep(3)
        assert process.poll() is None, f"the run ended before it could be stopped:\n{log.read_text(errors='replace')}"
        stop = images.engine_run("stop", "--time", "30", name)
        assert stop.returncode == 0, failed(f"{images.engine} stop", stop)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        images.engine_run("rm", "-f", name)
    text = log.read_text(errors="replace")
    assert code == 130, f"after SIGTERM the exit code was {code}, not 130:\n{text}"
    assert "harness: terminated" in text, f"the harness did not report the SIGTERM:\n{text}"
    assert partial.exists(), "the stopped run left no predictions.csv.partial"
    assert not (output / "predictions.csv").exists(), "a stopped run left a predictions.csv"


@container_test
def test_debug_sh_runs_an_edited_checkout_without_a_rebuild(
    images: Images, host_predictions: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "checkout"
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    marker = f"0.0.0+debug{os.getpid()}"
    init = copy / "harness" / "__init__.py"
    text, edits = re.subn(r"(?m)^__version__ = .*$", f'__version__ = "{marker}"', init.read_text(encoding="utf-8"))
    assert edits == 1, f"no __version__ line to edit in {init}"
    init.write_text(text, encoding="utf-8")
    before = images.image_id(images.cpu)

    output = tmp_path / "out"
    result = images.script("debug.sh", "--repo", copy, images.cpu, SAMPLES, output, "--", "--progress", "false")
    assert result.returncode == 0, failed("debug.sh", result)
    version = run_json(output)["harness_version"]
    assert version == marker, f"debug.sh ran the image's code, not the edited copy's (harness_version {version})"
    assert images.image_id(images.cpu) == before, "the image changed"
    problems = compare_predictions(host_predictions, output / "predictions.csv", BUILD_TOLERANCE)
    assert not problems, "debug.sh's predictions differ from the host run's:\n" + "\n".join(problems)


@container_test
def test_save_sh_archive_loads_back_as_the_same_image(images: Images, tmp_path: Path) -> None:
    archive = tmp_path / "base.tar.gz"
    result = images.script("save.sh", "-o", archive, "--level", "1", images.base)  # the smallest image
    assert result.returncode == 0, failed("save.sh", result)
    with tarfile.open(archive) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None, "the archive has no manifest.json"
        manifest = json.load(manifest_file)
    config = manifest[0]["Config"].split("/")[-1].removesuffix(".json")
    assert config == images.image_id(images.base), "the archive holds another image"
    unpacked = tmp_path / "base.tar"  # podman 4 loads no gzip
    with gzip.open(archive) as source, open(unpacked, "wb") as target:
        shutil.copyfileobj(source, target)
    loaded = images.engine_run("load", "-i", unpacked)
    assert loaded.returncode == 0, failed("the archive's load", loaded)
    assert f"Loaded image: {images.base}" in loaded.stdout + loaded.stderr, loaded.stdout + loaded.stderr
    assert images.image_id(images.base) == config


@container_test
def test_build_stops_at_once_on_a_missing_checkpoint(images: Images) -> None:
    """Dockerfile's first stage refuses a MODEL_CHECKPOINT not in model/, before pip (build.sh checks first:
    tests/test_scripts.py; so the engine is called directly here)."""
    start = time.monotonic()
    result = images.engine_run(
        *("build", "-f", REPO / "Dockerfile.cpu", "--build-arg", f"BASE_IMAGE={images.base}"),
        *("--build-arg", "MODEL_CHECKPOINT=no-such-weights.pth"),
        *("--build-arg", "PIP_NO_INDEX=1", "--build-arg", "PIP_FIND_LINKS=/wheels"),
        *("--network", "none", "--volume", f"{images.wheelhouse}:/wheels:ro", REPO),
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, "the build with MODEL_CHECKPOINT=no-such-weights.pth succeeded"
    assert "MODEL_CHECKPOINT=no-such-weights.pth is not a file in model/" in log, log
    assert "pip install" not in log, "the build reached pip before failing on the checkpoint"
    assert time.monotonic() - start < 120


def in_image(images: Images, image: str, *args: str) -> str:
    """python3 ARGS in the image, with no network; its stdout."""
    result = images.engine_run("run", "--rm", "--network", "none", "--entrypoint", "python3", image, *args)
    assert result.returncode == 0, failed(f"python3 {' '.join(args[:3])} in {image}", result)
    return result.stdout


def installed(images: Images, image: str) -> dict[str, str]:
    """name -> version of every package pip lists in the image."""
    listed = json.loads(in_image(images, image, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"))
    return {package["name"].lower().replace("_", "-"): package["version"] for package in listed}


@container_test
def test_each_image_holds_one_onnx_runtime(images: Images) -> None:
    """onnxruntime and onnxruntime-gpu install the same `onnxruntime` module, so an image with both can lose the
    CUDA provider: the GPU image holds onnxruntime-gpu only, with the CUDA provider built in (listing the providers
    needs no GPU), and the CPU image onnxruntime only."""
    for image, runtime in ((images.gpu, "onnxruntime-gpu"), (images.cpu, "onnxruntime")):
        found = sorted(set(installed(images, image)) & {"onnxruntime", "onnxruntime-gpu"})
        assert found == [runtime], f"pip list in {image} shows {found}, not {runtime} alone"
    program = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"
    providers = json.loads(in_image(images, images.gpu, "-c", program).strip().splitlines()[-1])
    assert "CUDAExecutionProvider" in providers, f"the GPU image's onnxruntime has no CUDA provider: {providers}"


@container_test
def test_each_image_holds_the_locks_versions(images: Images) -> None:
    """Every package the lock (constraints.txt) pins is installed at that version in both images (the stand-ins'
    Python is 3.11): an image built next month holds what CI tested."""
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#") and ('python_version == "3.11"' in line or ";" not in line):
            name, _, version = line.split(";")[0].strip().partition("==")
            pins[name.lower()] = version
    for image in (images.cpu, images.gpu):
        present = installed(images, image)
        drifted = {n: (present[n], v) for n, v in pins.items() if n in present and present[n].split("+")[0] != v}
        assert not drifted, f"{image} holds other versions than the lock (installed, locked): {drifted}"
        for name in ("numpy", "pillow", "pyspng", "torch", "safetensors"):
            assert name in present, f"{image} lacks {name}"
