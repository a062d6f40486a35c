"""The predictions themselves pinned, byte for byte, with the head start and without, with workers and in-process,
so a refactor that moves a number, a row or a byte shows here. tests/golden/NAME.csv are the CSVs the harness wrote
for the sample images and the shared ObjectNet samples before the package was laid out by role (0.1.0), the model
run as written (`--fold-batchnorm false`); NAME.folded.csv the same runs with its BatchNorms folded, the default
since 0.2.0: the same top-5 classes, probabilities that differ in the sixth digit at most
(tests/test_fold.py checks how far)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from tests.helpers import REPO, SAMPLES, shared_file

GOLDEN = REPO / "tests" / "golden"
IN_PROCESS = ["--head-start", "false", "--workers", "0"]


@pytest.mark.parametrize(
    ("options", "pinned"),
    [
        ([], "folded"),
        (IN_PROCESS, "folded"),
        (["--fold-batchnorm", "false"], ""),
        ([*IN_PROCESS, "--fold-batchnorm", "false"], ""),
    ],
    ids=["default", "in-process", "as-written", "as-written-in-process"],
)
@pytest.mark.parametrize("name", ["sample-images", "objectnet-samples"])
def test_predictions_are_byte_identical_to_the_pinned_ones(
    tmp_path: Path, name: str, options: list[str], pinned: str
) -> None:
    images = SAMPLES if name == "sample-images" else shared_file("objectnet-samples")
    output = tmp_path / "predictions.csv"
    assert main([str(images), str(output), "--progress", "false", *options]) == 0
    assert output.read_bytes() == (GOLDEN / ".".join(filter(None, [name, pinned, "csv"]))).read_bytes()
    assert (tmp_path / "errors.csv").read_bytes() == b""
