"""Shared fixtures; the helpers they and the tests share live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import ENV_FIELDS
from tests.helpers import REPO, SAMPLES, read_rows


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
