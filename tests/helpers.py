"""What the tests share (plain functions, no fixtures: those live in conftest.py): the repository's real sample
images and folders, reading a CSV as the harness writes it, the shared folder beside the repository, and comparing
two predictions CSVs row by row."""

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


# ---- predictions CSVs compared row by row (tests/test_container.py) ----


def compare_predictions(expected: Path, actual: Path, tolerance: float = 1e-4) -> list[str]:
    """What differs between two predictions CSVs of the same images, one line per problem; empty when they agree.

    They agree when they hold the same keys in the same order, the same class ids in every row, and confidences
    within `tolerance` of each other (two builds of the same model differ in float noise only).
    """
    want, got = read_rows(expected), read_rows(actual)
    problems: list[str] = []
    if not want:
        problems.append(f"{expected} has no rows")
    want_keys, got_keys = [row[0] for row in want], [row[0] for row in got]
    if want_keys != got_keys:
        missing = sorted(set(want_keys) - set(got_keys))
        extra = sorted(set(got_keys) - set(want_keys))
        problems.append(f"keys differ: missing {missing}, extra {extra} (or a different order)")
    worst, worst_key = 0.0, ""
    for want_row, got_row in zip(want, got, strict=False):
        if len(want_row) != len(got_row) or want_row[1::2] != got_row[1::2]:
            problems.append(f"{want_row[0]}: class ids {want_row[1::2]} vs {got_row[1::2]}")
            continue
        for a, b in zip(want_row[2::2], got_row[2::2], strict=True):
            if abs(float(a) - float(b)) > worst:
                worst, worst_key = abs(float(a) - float(b)), want_row[0]
    if worst > tolerance:
        problems.append(f"confidences differ by up to {worst:.2e} (more than {tolerance:g}), in {worst_key}")
    return problems
