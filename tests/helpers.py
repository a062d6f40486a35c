"""What the tests share (plain functions, no fixtures: those live in conftest.py): the repository's real sample
images and folders, reading a CSV as the harness writes it, the shared folder beside the repository, and comparing
two predictions CSVs row by row."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from harness.config import ENV_FIELDS
from harness.results.rows import Layout
from harness.results.writer import open_csv

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample-images"
# Beside the repository; the mutation pass runs these tests from a copy in mutants/, one folder deeper.
SHARED = next(
    (folder / "shared" for folder in REPO.parents[:2] if (folder / "shared").is_dir()), REPO.parent / "shared"
)
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


# ---- predictions CSVs compared row by row (goldens, containers, equivalences) ----

# How far a confidence may move between two CPUs (AVX2, AVX-512, Arm) or kernel sets (ATEN_CPU_CAPABILITY): the
# printed six significant digits moved by at most 1e-6 between them (docs/benchmarks.md); twenty times that.
CPU_TOLERANCE = 2e-5


def ids_and_confidences(row: list[str]) -> tuple[list[int], list[float]]:
    """A written row's ids and confidences, read as harness/results/rows.py reads a row."""
    parts = Layout.of_columns(len(row)).split(row)
    return [int(x) for x in parts.ids], [float(x) for x in parts.scores]


def compare_rows(want: list[str], got: list[str], tolerance: float) -> tuple[list[str], float]:
    """What differs between two rows of the same key, and the largest confidence difference.

    Class ids must be equal, except inside a tie: ids whose confidences the expected row holds within `tolerance`
    of each other may come out in either order on another CPU, so each such run of ids is compared as a set.
    Confidences are compared slot by slot (both rows are sorted by confidence). Rows that are not all numbers (a
    failure's empty ids) must be equal.
    """
    if len(want) != len(got):
        return [f"{want[0]}: {len(want)} fields vs {len(got)}"], 0.0
    layout = Layout.of_columns(len(want))
    wanted, gotten = layout.split(want), layout.split(got)
    want_ids, got_ids = wanted.ids, gotten.ids
    try:
        want_conf = [float(value) for value in wanted.scores]
        got_conf = [float(value) for value in gotten.scores]
    except ValueError:
        return ([] if want == got else [f"{want[0]}: {want[1:]} vs {got[1:]}"]), 0.0
    worst = max((abs(a - b) for a, b in zip(want_conf, got_conf, strict=True)), default=0.0)
    start = 0
    for end in range(1, len(want_ids) + 1):
        if end < len(want_ids) and want_conf[end - 1] - want_conf[end] <= tolerance:
            continue  # a tie: the run of ids goes on
        if sorted(want_ids[start:end]) != sorted(got_ids[start:end]):
            return [f"{want[0]}: class ids {want_ids} vs {got_ids}"], worst
        start = end
    return [], worst


def compare_predictions(expected: Path, actual: Path, tolerance: float = CPU_TOLERANCE) -> list[str]:
    """What differs between two predictions CSVs of the same images, one line per problem; empty when they agree.

    They agree when they hold the same keys in the same order, the same class ids in every row (up to ties,
    `compare_rows`), and confidences within `tolerance` of each other.
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
        row_problems, row_worst = compare_rows(want_row, got_row, tolerance)
        problems += row_problems
        if row_worst > worst:
            worst, worst_key = row_worst, want_row[0]
    if worst > tolerance:
        problems.append(f"confidences differ by up to {worst:.2e} (more than {tolerance:g}), in {worst_key}")
    return problems


def tiny_hf_vit(folder: Path, classes: int = 10, image_size: int = 224) -> Path:
    """A small Hugging Face ViT with random (seeded) weights and its image processor, saved as save_pretrained
    saves them: a real folder for the `hf` kind, nothing downloaded."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
        num_labels=classes,
    )
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
