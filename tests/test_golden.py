"""The predictions themselves pinned, so a refactor that moves a class, a row or a digit shows here.

tests/golden/NAME.csv are the CSVs the harness wrote for the sample images and the shared ObjectNet samples before
the package was laid out by role (0.1.0), the model run as written (`--fold-batchnorm false`); NAME.folded.csv the
same runs with its BatchNorms folded, the default since 0.2.0 (tests/test_fold.py checks how far the two differ).

Another CPU rounds the model's arithmetic differently (AVX2, AVX-512 and Arm kernels; `ATEN_CPU_CAPABILITY` switches
them on one machine), so the pins are the keys, the class ids and the confidences within `CPU_TOLERANCE`. What
holds byte for byte is what the harness itself promises on one machine: the head start and the DataLoader, or
in-process decoding, give the same file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from tests.helpers import REPO, SAMPLES, compare_predictions, shared_file

GOLDEN = REPO / "tests" / "golden"
IN_PROCESS = ["--head-start", "false", "--workers", "0"]

pytestmark = pytest.mark.equivalence


@pytest.mark.parametrize(("options", "pinned"), [([], "folded"), (["--fold-batchnorm", "false"], "")])
@pytest.mark.parametrize("name", ["sample-images", "objectnet-samples"])
def test_predictions_match_the_pinned_ones_and_are_byte_identical_in_process(
    tmp_path: Path, name: str, options: list[str], pinned: str
) -> None:
    images = SAMPLES if name == "sample-images" else shared_file("objectnet-samples")
    default, in_process = tmp_path / "default" / "predictions.csv", tmp_path / "in-process" / "predictions.csv"
    assert main([str(images), str(default), "--progress", "false", *options]) == 0
    assert main([str(images), str(in_process), "--progress", "false", *options, *IN_PROCESS]) == 0
    problems = compare_predictions(GOLDEN / ".".join(filter(None, [name, pinned, "csv"])), default)
    assert not problems, "\n".join(problems)
    assert in_process.read_bytes() == default.read_bytes()
    assert (default.parent / "errors.csv").read_bytes() == b""
