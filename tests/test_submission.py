"""Zip submissions: a model folder in a zip runs; traversal, links and oversized zips are refused."""

from __future__ import annotations

import io
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cli import main
from harness.errors import ModelError
from harness.models.submission import extract_submission
from tests.helpers import REPO, SAMPLES, env_without_build_args, read_rows

MODEL_PY = """from torch import nn

from layers import head  # a sibling file in the zip


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = head()

    def forward(self, x):
        return self.head(self.features(x))
"""


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def _tiny_submission(tmp_path: Path, prefix: str) -> Path:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state |= {f"head.{k}": v for k, v in nn.Linear(4, 3).state_dict().items()}
    weights = io.BytesIO()
    torch.save(state, weights)
    files = {
        "model.py": MODEL_PY.encode(),
        "layers.py": b"from torch import nn\n\n\ndef head():\n    return nn.Linear(4, 3)\n",
        "weights.pt": weights.getvalue(),
        "config.yaml": b"class_name: Tiny\ncheckpoint: weights.pt\npreprocess:\n  input_size: 32\n  resize_size: 32\n",
    }
    return _zip(tmp_path / "submission.zip", {prefix + name: data for name, data in files.items()})


@pytest.mark.parametrize("prefix", ["", "my-model/"])
def test_a_zip_submission_runs(tmp_path: Path, prefix: str) -> None:
    submission = _tiny_submission(tmp_path, prefix)
    output = tmp_path / "out" / "predictions.csv"
    assert main([str(SAMPLES), str(output), "--model-dir", str(submission), "--progress", "false"]) == 0
    rows = read_rows(output)
    assert len(rows) == 19 and all(len(row) == 7 and row[1] in ("0", "1", "2") for row in rows)


@pytest.mark.slow
def test_the_process_removes_the_unpacked_zip_when_it_exits(tmp_path: Path) -> None:
    """The entrypoint ends without Python's teardown (cli.exit_process); the atexit clean-up must still run and
    the closing line must still reach a piped stdout."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    output = tmp_path / "out" / "predictions.csv"
    argv = [str(SAMPLES), str(output), "--model-dir", str(_tiny_submission(tmp_path, "")), "--progress", "false"]
    result = subprocess.run(
        [sys.executable, "entrypoint.py", *argv],
        cwd=REPO,
        env={**env_without_build_args(), "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "19 images, 0 failed" in result.stdout
    assert list(temp.iterdir()) == []


def test_path_traversal_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    submission = _zip(tmp_path / "evil.zip", {"model.py": b"", "../escaped.py": b"print('owned')"})
    output = tmp_path / "out" / "predictions.csv"
    assert main([str(SAMPLES), str(output), "--model-dir", str(submission), "--progress", "false"]) == 4
    assert "entry '../escaped.py' would be written outside the folder" in capsys.readouterr().err
    destination = tmp_path / "unpack" / "here"
    destination.mkdir(parents=True)
    with pytest.raises(ModelError, match="outside the folder"):
        extract_submission(submission, destination)
    assert not (tmp_path / "unpack" / "escaped.py").exists() and not list(destination.iterdir())


def test_absolute_paths_and_symlinks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="outside the folder"):
        extract_submission(_zip(tmp_path / "abs.zip", {"/etc/cron.d/x": b""}), tmp_path)
    link = zipfile.ZipInfo("weights.pt")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ModelError, match="is a symbolic link"):
        extract_submission(tmp_path / "link.zip", tmp_path / "x")


def test_the_size_limit_counts_unpacked_bytes(tmp_path: Path) -> None:
    submission = _zip(tmp_path / "big.zip", {"model.py": b"0" * 5000})  # compresses to a few bytes
    with pytest.raises(ModelError, match="declares 5,000 bytes unpacked, more than 1,000"):
        extract_submission(submission, tmp_path / "x", max_bytes=1000)
