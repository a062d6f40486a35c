"""Whole saved models: TorchScript runs; a pickled module needs --trust-pickle."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cli import main
from tests.helpers import SAMPLES, read_rows

CONFIG = "preprocess:\n  input_size: 32\n  resize_size: 32\n"


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def _folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.yaml").write_text(CONFIG)
    return folder / name


def _run(tmp_path: Path, folder: Path, *options: str) -> int:
    output = tmp_path / "out" / "predictions.csv"
    return main([str(SAMPLES), str(output), "--model-dir", str(folder), "--progress", "false", *options])


def test_a_torchscript_folder_runs(tmp_path: Path) -> None:
    path = _folder(tmp_path, "model.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.trace(_tiny(), torch.zeros(1, 3, 32, 32)).save(str(path))
    assert _run(tmp_path, path.parent, "--topk", "1") == 0
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 19 and all(row[1] in ("0", "1", "2") for row in rows)


def test_a_pickled_module_needs_trust_pickle(tmp_path: Path, capsys) -> None:
    path = _folder(tmp_path, "whole.pt")
    torch.save(_tiny(), path)
    assert _run(tmp_path, path.parent) == 4
    assert "Pass --trust-pickle if you trust its author" in capsys.readouterr().err
    assert not (tmp_path / "out" / "predictions.csv").exists()
    assert _run(tmp_path, path.parent, "--trust-pickle") == 0
    assert len(read_rows(tmp_path / "out" / "predictions.csv")) == 19


def test_a_pickled_non_module_is_refused_even_when_trusted(tmp_path: Path, capsys) -> None:
    path = _folder(tmp_path, "weights.pt")
    torch.save([_tiny()], path)
    assert _run(tmp_path, path.parent, "--trust-pickle") == 4
    assert "holds a list, not a model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize("trust", [(), ("--trust-pickle",)])
def test_a_state_dict_given_as_the_model_is_told_how_to_run_it(tmp_path: Path, capsys, trust: tuple) -> None:
    path = _folder(tmp_path, "weights.pt")
    torch.save(_tiny().state_dict(), path)
    assert _run(tmp_path, path.parent, *trust) == 4
    error = capsys.readouterr().err
    assert "holds weights only (a state_dict)" in error and f"--checkpoint {path}" in error
