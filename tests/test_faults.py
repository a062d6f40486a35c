"""Faults: a run killed part way resumes to a byte-identical CSV; dead, slow or hung workers and device
out-of-memory give a named error or a smaller batch, never a hang or a lost row."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import harness.pipeline.runner
from harness.cli import main
from harness.config import Preprocess
from harness.pipeline.devices import DeviceNormalizer, DevicePlan
from harness.pipeline.forward import Forward
from tests.helpers import REPO, SAMPLES, env_without_build_args, read_rows


def _many_images(folder: Path, copies: int) -> Path:
    folder.mkdir()
    for n in range(copies):
        for image in sorted(SAMPLES.glob("*.jp*g")) + sorted(SAMPLES.glob("c*.png")):
            shutil.copy(image, folder / f"{n:03d}-{image.name}")
    (folder / "500-broken.png").write_bytes(b"\x89PNG broken")
    return folder


def _start(images: Path, output: Path, *extra: str) -> subprocess.Popen:
    argv = [
        sys.executable,
        "entrypoint.py",
        str(images),
        str(output),
        "--batch_size",
        "4",
        "--workers",
        "1",
        "--progress",
        "false",
        "--max-failures",
        "1",  # the broken PNG: 1 of 49 is more than the default 1%
        *extra,
    ]
    return subprocess.Popen(
        argv, cwd=REPO, env=env_without_build_args(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_rows(path: Path, rows: int, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= rows:
            return
        time.sleep(0.02)
    pytest.fail(f"{path} never reached {rows} rows (run ended: {process.poll()})")


@pytest.mark.equivalence
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_a_byte_identical_csv(tmp_path: Path, stop: signal.Signals) -> None:
    images = _many_images(tmp_path / "in", copies=6)
    total = len(list(images.iterdir()))
    reference = tmp_path / "ref" / "p.csv"
    assert _start(images, reference).wait(timeout=600) == 0

    output = tmp_path / "run" / "p.csv"
    process = _start(images, output)
    _wait_for_rows(output.with_name("p.csv.partial"), 10, process)
    process.send_signal(stop)
    code = process.wait(timeout=120)
    assert code == (130 if stop == signal.SIGTERM else -signal.SIGKILL)
    kept = read_rows(output.with_name("p.csv.partial"))
    assert 10 <= len(kept) < total and not output.exists()
    if stop == signal.SIGTERM:
        assert "rows finished so far are in" in (said := process.stderr.read()) and "with --resume goes on" in said

    assert _start(images, output, "--resume").wait(timeout=600) == 0
    assert output.read_bytes() == reference.read_bytes()
    assert output.with_name("errors.csv").read_bytes() == reference.with_name("errors.csv").read_bytes()
    assert not output.with_name("p.csv.partial").exists()


def test_resume_refuses_a_partial_file_from_other_images(tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    output.with_name("p.csv.partial").write_text("someone-else.png,1,0.5,2,0.1,3,0.1,4,0.1,5,0.1\n")
    code = main([str(SAMPLES), str(output), "--resume", "--progress", "false", "--workers", "0"])
    assert code == 2 and not output.exists()
    assert output.with_name("p.csv.partial").read_text().startswith("someone-else.png,")


TRANSFORM_HEAD = """import os, signal, time
import torchvision.transforms as T


class data_transform:
    def getTransform(self):
        base = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])

        def transform(image):
"""
TRANSFORM_TAIL = """
            return base(image)

        return transform
"""


def _model_folder(tmp_path: Path, transform_body: str) -> Path:
    """The example model with the template's transform hook, which runs inside the decoding workers."""
    folder = tmp_path / "model"
    shutil.copytree(REPO / "model", folder)
    body = textwrap.indent(textwrap.dedent(transform_body), " " * 12)
    (folder / "data_transform_description.py").write_text(TRANSFORM_HEAD + body + TRANSFORM_TAIL)
    return folder


@pytest.mark.slow
def test_a_slow_image_times_out_alone(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path, "if image.size == (447, 296):  # chelsea.png less its border\n    time.sleep(30)")
    output = tmp_path / "p.csv"
    argv = [
        str(SAMPLES),
        str(output),
        "--model-dir",
        str(folder),
        "--decode-timeout",
        "5",  # far above any sample image's decode on a busy machine, far below the stuck one's 30 s
        "--workers",
        "1",
        "--decoder-priority",
        "normal",  # an idle-priority worker on a busy machine could starve past any timeout
        "--progress",
        "false",
        "--max-failures",
        "1",
    ]
    started = time.monotonic()
    assert main(argv) == 0
    assert time.monotonic() - started < 25
    errors = read_rows(output.with_name("errors.csv"))
    assert [row[0] for row in errors] == ["chelsea.png"] and "DecodeTimeout" in errors[0][1]
    assert len(read_rows(output)) == 19


def _worker_fault_argv(tmp_path: Path, model_folder: Path) -> list[str]:
    return [
        str(SAMPLES),
        str(tmp_path / "p.csv"),
        "--model-dir",
        str(model_folder),
        "--workers",
        "1",
        "--batch_size",
        "4",
        "--decoder-priority",
        "normal",  # an idle-priority worker on a busy machine could starve past the loader's timeout
        "--progress",
        "false",
    ]


@pytest.mark.slow
def test_a_killed_worker_is_an_error_naming_the_files(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path, "if image.size == (447, 296):\n    os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run(
        [sys.executable, "entrypoint.py", *_worker_fault_argv(tmp_path, folder)],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 8, result.stderr
    assert "killed by signal" in result.stderr and "while decoding: chelsea.png" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "p.csv.partial").exists()


@pytest.mark.slow
def test_a_hung_worker_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """if image.size == (447, 296):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # stuck where the per-image alarm cannot reach
    time.sleep(60)"""
    folder = _model_folder(tmp_path, body)
    monkeypatch.setattr(harness.pipeline.runner, "loader_timeout", lambda decode_timeout: 8.0)
    started = time.monotonic()
    assert main(_worker_fault_argv(tmp_path, folder)) == 8
    assert time.monotonic() - started < 40
    stderr = capsys.readouterr().err
    assert "timed out" in stderr and "while decoding: chelsea.png" in stderr


def test_out_of_memory_halves_the_batch_and_keeps_the_results() -> None:
    class SmallMemory(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.append(len(x))
            if len(x) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return x.mean(dim=(2, 3))

    model = SmallMemory()
    plan = DevicePlan(torch.device("cpu"))
    normalize = DeviceNormalizer(Preprocess(), plan.device, torch.float32, channels_last=False)
    forward = Forward(model, normalize, plan, piece=8, classes=3)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(forward(images), normalize(images).mean(dim=(2, 3)))
    assert forward.piece == 2 and model.calls == [8, 4, 2, 2, 2, 2]
    forward(images[:3])
    assert model.calls[-2:] == [2, 1]  # the smaller piece size stays for later batches


def test_a_workers_death_is_told_by_the_signal_whichever_way_pytorch_raised_it() -> None:
    """PyTorch re-raises its SIGCHLD handler's error as 'exited unexpectedly' when it lands in a queue wait."""
    killed = RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed.")
    try:
        raise RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly") from killed
    except RuntimeError as reraised:
        assert harness.pipeline.runner._how_the_worker_failed(reraised) == str(killed)
    assert harness.pipeline.runner._how_the_worker_failed(killed) == str(killed)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("return image", "returned Image, not a 3 x H x W tensor"),
        ("return __import__('numpy').asarray(image)", "returned ndarray"),
        ("raise ValueError('no such size')", "failed on a blank image: "),
    ],
)
def test_a_model_folders_transform_that_gives_no_tensor_is_exit_4(tmp_path: Path, body: str, said: str, capsys) -> None:
    folder = _model_folder(tmp_path, body)
    argv = [str(SAMPLES), str(tmp_path / "p.csv"), "--model-dir", str(folder), "--progress", "false"]
    assert main(argv) == 4
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_transform_that_raises_on_one_image_is_the_models_error(tmp_path: Path, workers: str, capsys) -> None:
    """The model's own code failing is the model's error (exit 4, the image named), never a failure row that
    lets the run exit 0, in the main process and in a decoding worker alike."""
    body = """if image.size == (447, 296):  # chelsea.png less its border
    raise KeyError('no such crop')"""
    folder = _model_folder(tmp_path, body)
    output = tmp_path / "p.csv"
    argv = [str(SAMPLES), str(output), "--model-dir", str(folder), "--progress", "false", "--workers", workers]
    assert main([*argv, "--batch-size", "2"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("harness: error: data_transform_description.py's transform failed: KeyError"), err
    assert "(on chelsea.png)" in err[-1]
    assert not output.exists() and output.with_name("p.csv.partial").exists()


@pytest.mark.slow
def test_a_transform_that_changes_size_on_one_image_fails_that_image_alone(tmp_path: Path) -> None:
    body = """if image.size == (447, 296):  # chelsea.png less its border
    return T.ToTensor()(image)"""
    folder = _model_folder(tmp_path, body)
    output = tmp_path / "p.csv"
    argv = [str(SAMPLES), str(output), "--model-dir", str(folder), "--progress", "false", "--max-failures", "1"]
    assert main(argv) == 0
    reasons = dict(read_rows(tmp_path / "errors.csv"))
    assert "every image must come out the same size" in reasons["chelsea.png"]
    assert len(read_rows(output)) == 19


SLOW_TO_LOAD = """import pathlib
import time

import torch


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        pathlib.Path(MARK).touch()
        time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["check-model", "export-onnx", "check"])
def test_a_tool_stopped_by_docker_stop_is_exit_130_in_one_line(tmp_path: Path, tool: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    mark = Path("/dev/shm") / f"harness-test-{uuid.uuid4().hex}"  # a confined model may write there
    (folder / "model.py").write_text(SLOW_TO_LOAD.replace("MARK", repr(str(mark))))
    (folder / "config.yaml").write_text("class_name: Slow\n")
    command = [sys.executable, "-m", "harness", tool, "--model-dir", str(folder)]
    if tool == "export-onnx":
        command += ["--output", str(tmp_path / "m.onnx")]
    if tool == "check":
        command += ["--output", str(tmp_path / "check")]
    process = subprocess.Popen(
        command, cwd=REPO, env=env_without_build_args(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not mark.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    mark.unlink(missing_ok=True)
    assert err.strip().splitlines()[-1].startswith("harness: terminated") and "Traceback" not in err
