"""The predictions themselves pinned, byte for byte: tests/golden/ holds the CSVs the harness wrote for the sample
images and the shared ObjectNet samples before the package was laid out by role (0.1.0), so a refactor that moves
a number, a row or a byte shows here. With the head start and without, with workers and in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from tests.helpers import REPO, SAMPLES, shared_file

GOLDEN = REPO / "tests" / "golden"


@pytest.mark.parametrize("options", [[], ["--head-start", "false", "--workers", "0"]], ids=["default", "in-process"])
@pytest.mark.parametrize("name", ["sample-images", "objectnet-samples"])
def test_predictions_are_byte_identical_to_the_pinned_ones(tmp_path: Path, name: str, options: list[str]) -> None:
    images = SAMPLES if name == "sample-images" else shared_file("objectnet-samples")
    output = tmp_path / "predictions.csv"
    assert main([str(images), str(output), "--progress", "false", *options]) == 0
    assert output.read_bytes() == (GOLDEN / f"{name}.csv").read_bytes()
    assert (tmp_path / "errors.csv").read_bytes() == b""
