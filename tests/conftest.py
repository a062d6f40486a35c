"""Shared fixtures; the helpers they and the tests share live in tests/helpers.py."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import ENV_FIELDS
from tests.helpers import REPO, SAMPLES, read_rows

_CACHES = itertools.count()  # a folder name for each test's cache, made only where a run keeps an export


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs start from the repository root (model/ is relative) with none of the build-arg variables set, and
    each test's runs keep their exports in a cache of its own (never the user's: a test's export would be another
    test's, or a later session's)."""
    monkeypatch.chdir(REPO)
    for variable in ENV_FIELDS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "caches" / str(next(_CACHES))))


@pytest.fixture
def harness_run(tmp_path: Path) -> Callable[..., tuple[int, list[list[str]]]]:
    """Run `harness` in-process on sample-images; returns (exit code, rows of the CSV)."""

    def run(*options: str, images: Path = SAMPLES, name: str = "predictions.csv") -> tuple[int, list[list[str]]]:
        output = tmp_path / name
        code = main([str(images), str(output), "--progress", "false", *options])
        return code, (read_rows(output) if output.exists() else [])

    return run
