"""What the tests share: the repository's real sample images and folders, reading a CSV as the harness writes it,
and the shared folder beside the repository."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from harness.config import ENV_FIELDS
from harness.results.writer import open_csv

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample-images"
SHARED = REPO.parent / "shared"
OBJECTNET_SAMPLES = sorted(p.name for p in SAMPLES.glob("*.png") if len(p.stem) == 15)


def read_rows(path: Path) -> list[list[str]]:
    with open_csv(path) as f:
        return list(csv.reader(f))


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared folder sits beside the repository in CI)")
    return path


def env_without_build_args() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ENV_FIELDS}
