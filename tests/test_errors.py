"""Errors that mean what they say: exit codes written once, the third-party errors recognised by their text
provoked for real (so a library upgrade that rewords one fails here, not in a user's run), and --traceback."""

from __future__ import annotations

import ast
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from harness import cli
from harness.cli import main
from harness.errors import (
    ERROR_TYPES,
    EXIT_CODES,
    HarnessError,
    PipelineError,
    error_type,
    is_dataloader_failure,
    is_onnx_package_missing,
    is_shared_memory_full,
    refused_pickle_globals,
)
from tests.helpers import REPO, SAMPLES


def test_exit_codes_are_one_per_error_type_and_the_readme_shows_them() -> None:
    codes = [error.exit_code for error in ERROR_TYPES]
    assert len(set(codes)) == len(codes)
    assert all(error_type(error.exit_code) is error for error in ERROR_TYPES)
    assert error_type(1) is HarnessError
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = "".join(f"| {code} | {meaning} |\n" for code, meaning in sorted(EXIT_CODES.items()))
    assert table in readme


class Unlisted:
    """A class torch.load(weights_only=True) does not allow."""


def test_a_refused_pickle_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"weights": torch.zeros(1), "extra": Unlisted()}, path)
    with pytest.raises(pickle.UnpicklingError) as caught:
        torch.load(path, weights_only=True)
    assert refused_pickle_globals(caught.value) == [f"{__name__}.Unlisted"]
    assert refused_pickle_globals(pickle.UnpicklingError("invalid load key, 'x'.")) is None


class _Dies(Dataset):
    def __init__(self, how: str) -> None:
        self.how = how

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        if self.how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(2)  # hung past the loader's 1 s timeout, and back soon after to be shut down
        return index


@pytest.mark.parametrize(("how", "timeout"), [("killed", 0), ("hung", 1)])
def test_a_dataloader_worker_failure_is_recognised(how: str, timeout: int) -> None:
    batches = iter(DataLoader(_Dies(how), batch_size=1, num_workers=1, timeout=timeout))
    try:
        with pytest.raises(RuntimeError) as caught:
            next(batches)
    finally:  # reaped here: left to the garbage collector, a hung worker's shutdown stalls whichever test is running
        batches._shutdown_workers()
    assert is_dataloader_failure(caught.value)
    assert not is_dataloader_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.slow
def test_the_missing_onnx_package_is_recognised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails, as where it is not installed
    with pytest.raises(Exception) as caught, pytest.warns(DeprecationWarning):
        torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(tmp_path / "m.onnx"), dynamo=False)
    assert is_onnx_package_missing(caught.value)
    assert not is_onnx_package_missing(RuntimeError("Unsupported: ONNX export of operator foo"))


def test_traceback_shows_the_error_that_caused_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    argv = [
        str(SAMPLES),
        str(tmp_path / "p.csv"),
        "EfficientNetLite0",
        str(tmp_path / "broken.pth"),
        "--progress",
        "false",
    ]
    assert main(argv) == 4
    plain = capsys.readouterr().err
    assert "Traceback" not in plain and plain.count("\n") == 1 and "is not a PyTorch checkpoint" in plain
    assert main([*argv, "--traceback"]) == 4
    shown = capsys.readouterr().err
    assert "UnpicklingError" in shown and "which caused:" in shown and "ModelError" in shown
    assert shown.strip().splitlines()[-1] == plain.strip()


class _StoppedWhileTold(PipelineError):
    """An error whose line is being printed as a stop arrives: torchrun's agent ends every rank when one dies, so
    a rank telling its own error meets the SIGTERM there (a race in CI, made certain here)."""

    def __init__(self, stop: signal.Signals) -> None:
        super().__init__("another rank stopped answering")
        self.stops = [stop]

    def __str__(self) -> str:
        stops, self.stops = self.stops, []  # once: a report of this test's failure reads it again
        for stop in stops:
            os.kill(os.getpid(), stop)
        return super().__str__()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_an_outcome_is_told_leaves_that_outcome(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stop: signal.Signals
) -> None:
    def failing(argv: list[str], environ: dict[str, str]) -> int:
        raise _StoppedWhileTold(stop)

    monkeypatch.setattr(cli, "load_command", lambda name: failing)
    assert main(["validate"]) == PipelineError.exit_code
    assert capsys.readouterr().err == "harness: error: another rank stopped answering\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_in_an_errors_clean_up_leaves_that_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stop: signal.Signals
) -> None:
    """The clean-up finishes and the error is told: a stop raised there would have put its own line in place."""
    cleaned = []

    def failing(argv: list[str], environ: dict[str, str]) -> int:
        try:
            raise PipelineError("another rank stopped answering")
        finally:
            os.kill(os.getpid(), stop)
            cleaned.append(True)

    monkeypatch.setattr(cli, "load_command", lambda name: failing)
    assert main(["validate"]) == PipelineError.exit_code
    assert cleaned and capsys.readouterr().err == "harness: error: another rank stopped answering\n"


@pytest.mark.parametrize(
    ("stop", "said"), [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")], ids=["SIGTERM", "SIGINT"]
)
def test_a_stop_while_a_command_runs_stops_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stop: signal.Signals, said: str
) -> None:
    def stopped(argv: list[str], environ: dict[str, str]) -> int:
        os.kill(os.getpid(), stop)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "load_command", lambda name: stopped)
    assert main(["validate"]) == 130
    assert capsys.readouterr().err == f"harness: {said}\n"


def test_a_file_a_tool_cannot_read_has_its_own_exit_code(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_bytes(b"\xff\xfe not utf-8 \x00")
    (tmp_path / "answers.json").write_text("{not json")
    assert main(["score", str(tmp_path / "p.csv"), "--answers", str(tmp_path / "answers.json")]) == 10
    (tmp_path / "probs.npz").write_text("not an npz")
    assert main(["ensemble", str(tmp_path / "probs.npz"), "--output", str(tmp_path / "out.csv")]) == 10


SHM_FULL = """
import torch
from torch.utils.data import DataLoader


class Big(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.zeros(2**20)  # 4 MB a sample, in a 1 MB /dev/shm


try:
    next(iter(DataLoader(Big(), batch_size=2, num_workers=1)))
except RuntimeError as error:
    print(repr(str(error)))
"""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to mount a small /dev/shm")
def test_a_full_shared_memory_is_recognised_as_torch_words_it() -> None:
    """A worker's batch that does not fit in /dev/shm, for real (a 1 MB tmpfs in a mount namespace of its own)."""
    script = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && {sys.executable} -c {shlex.quote(SHM_FULL)}"
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    error = RuntimeError(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    assert is_dataloader_failure(error) and is_shared_memory_full(error), error
    assert not is_shared_memory_full(RuntimeError("DataLoader worker (pid 7) exited unexpectedly"))
