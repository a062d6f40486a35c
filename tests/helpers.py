"""Helpers shared by test modules (plain functions, no fixtures: those live in conftest.py)."""

from __future__ import annotations

import csv
from pathlib import Path

# ---- predictions CSVs compared row by row (tests/test_container.py) ----


def read_prediction_rows(path: Path) -> list[list[str]]:
    """The rows of a predictions CSV as the harness writes it (no header; names may hold any byte)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))


def compare_predictions(expected: Path, actual: Path, tolerance: float = 1e-4) -> list[str]:
    """What differs between two predictions CSVs of the same images, one line per problem; empty when they agree.

    They agree when they hold the same keys in the same order, the same class ids in every row, and confidences
    within `tolerance` of each other (two builds of the same model differ in float noise only).
    """
    want, got = read_prediction_rows(expected), read_prediction_rows(actual)
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
