"""--save-probs and `harness ensemble`: the ensemble of a model with itself is the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.tools.ensemble import average
from tests.helpers import read_rows


def _save(path: Path, keys: list[str], probs: list[list[float]], softmax: bool = True) -> Path:
    np.savez(path, keys=np.array(keys), probs=np.array(probs, dtype=np.float32), softmax=np.array(softmax))
    return path


@pytest.mark.slow  # one real EfficientNet-Lite0 run: about 10 s on two CPU cores
def test_the_real_model_ensembled_with_itself_is_the_model(harness_run, tmp_path: Path) -> None:
    probs = tmp_path / "lite0.npz"
    code, rows = harness_run("--save-probs", str(probs))
    assert code == 0
    with np.load(probs) as data:
        assert data["probs"].shape == (19, 1000) and list(data["keys"]) == [row[0] for row in rows]
        assert np.allclose(data["probs"].sum(axis=1), 1, atol=1e-5)
    output = tmp_path / "ensemble.csv"
    assert main(["ensemble", str(probs), str(probs), "--output", str(output)]) == 0
    ensembled = read_rows(output)
    assert [[row[0], *row[1::2]] for row in ensembled] == [[row[0], *row[1::2]] for row in rows]
    # the same confidences to the CSV's 6 digits, give or take the last one (float32 log/softmax round trip)
    got = [float(c) for row in ensembled for c in row[2::2]]
    assert got == pytest.approx([float(c) for row in rows for c in row[2::2]], rel=1e-5)


def test_averaging_by_hand_and_failed_rows(tmp_path: Path) -> None:
    first = _save(tmp_path / "a.npz", ["x.png", "y.png", "z.png"], [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [np.nan] * 3])
    second = _save(tmp_path / "b.npz", ["x.png", "y.png", "z.png"], [[0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [1, 0, 0]])
    keys, mean, softmax = average([first, second])
    assert keys == ["x.png", "y.png", "z.png"] and softmax
    assert np.allclose(mean[:2], [[0.4, 0.5, 0.1], [0.1, 0.2, 0.7]])
    output = tmp_path / "p.csv"
    assert main(["ensemble", str(first), str(second), "--output", str(output), "--topk", "2"]) == 0
    assert read_rows(output) == [
        ["x.png", "1", "0.5", "0", "0.4"],
        ["y.png", "2", "0.7", "1", "0.2"],
        ["z.png", "-1", "0", "-1", "0"],
    ]


def test_runs_over_different_images_are_refused(tmp_path: Path, capsys) -> None:
    first = _save(tmp_path / "a.npz", ["x.png"], [[0.5, 0.5]])
    second = _save(tmp_path / "b.npz", ["y.png"], [[0.5, 0.5]])
    assert main(["ensemble", str(first), str(second), "--output", str(tmp_path / "p.csv")]) == 10
    assert "the runs must cover the same images" in capsys.readouterr().err
