"""Shared fixtures: the repository's real sample images and model, and a way to run the CLI in-process."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import ENV_FIELDS
from harness.writer import open_csv

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample-images"
SHARED = REPO.parent / "shared"
OBJECTNET_SAMPLES = sorted(p.name for p in SAMPLES.glob("*.png") if len(p.stem) == 15)


def read_rows(path: Path) -> list[list[str]]:
    with open_csv(path) as f:
        return list(csv.reader(f))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs start from the repository root (model/ is relative) with none of the build-arg variables set."""
    monkeypatch.chdir(REPO)
    for variable in ENV_FIELDS:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def harness_run(tmp_path: Path) -> Callable[..., tuple[int, list[list[str]]]]:
    """Run `harness` in-process on sample-images; returns (exit code, rows of the CSV)."""

    def run(*options: str, images: Path = SAMPLES, name: str = "predictions.csv") -> tuple[int, list[list[str]]]:
        output = tmp_path / name
        code = main([str(images), str(output), "--progress", "false", *options])
        return code, (read_rows(output) if output.exists() else [])

    return run


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared folder sits beside the repository in CI)")
    return path


def env_without_build_args() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ENV_FIELDS}
