"""--save-probs and `harness ensemble`: the ensemble of a model with itself is the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.tools.ensemble import average
from tests.helpers import ids_and_confidences, read_rows


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
    assert [row[0] for row in ensembled] == [row[0] for row in rows]
    assert [ids_and_confidences(row)[0] for row in ensembled] == [ids_and_confidences(row)[0] for row in rows]
    # the same confidences to the CSV's 6 digits, give or take the last one (float32 log/softmax round trip)
    got = [c for row in ensembled for c in ids_and_confidences(row)[1]]
    assert got == pytest.approx([c for row in rows for c in ids_and_confidences(row)[1]], rel=1e-5)


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
        ["z.png", "", "0", "", "0"],
    ]


def test_runs_over_different_images_are_refused(tmp_path: Path, capsys) -> None:
    first = _save(tmp_path / "a.npz", ["x.png"], [[0.5, 0.5]])
    second = _save(tmp_path / "b.npz", ["y.png"], [[0.5, 0.5]])
    assert main(["ensemble", str(first), str(second), "--output", str(tmp_path / "p.csv")]) == 10
    assert "the runs must cover the same images" in capsys.readouterr().err


def test_an_ensemble_is_judged_as_a_run_is(tmp_path: Path, capsys) -> None:
    """Exit 0 only for a CSV that is right to submit: non-finite averages become failure rows (all failed: exit 7),
    two keys sharing a basename in an ObjectNet file are exit 9, and an ObjectNet file has exactly five pairs."""
    output = tmp_path / "p.csv"
    infinite = _save(tmp_path / "inf.npz", ["x.png", "y.png"], [[np.inf, 0.0], [0.5, np.nan]])
    assert main(["ensemble", str(infinite), "--output", str(output), "--label-map", "none"]) == 7
    assert read_rows(output) == [["x.png", "", "0", "", "0"], ["y.png", "", "0", "", "0"]]
    assert "every one of the 2 images failed" in capsys.readouterr().err

    imagenet = np.full((2, 1000), 1e-3, dtype=np.float32)
    twins = _save(tmp_path / "twins.npz", ["a/cat.png", "b/cat.png"], imagenet.tolist())
    assert main(["ensemble", str(twins), "--output", str(output)]) == 9
    assert "duplicate key cat.png" in capsys.readouterr().err
    for topk in ("3", "2000"):
        assert main(["ensemble", str(twins), "--output", str(output), "--topk", topk]) == 2
        assert "reads exactly 5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"keys": np.array(["x.png"]), "probs": np.ones((2, 3)), "softmax": np.array(True)}, "1 keys for 2 rows"),
        ({"keys": np.array(["x.png"]), "probs": np.ones(3), "softmax": np.array(True)}, "must be N x C"),
        ({"keys": np.array(["x.png"]), "probs": np.ones((1, 0)), "softmax": np.array(True)}, "C >= 1"),
        ({"keys": np.array(["x.png"]), "probs": np.ones((1, 2), dtype=complex), "softmax": np.array(True)}, "real"),
        ({"keys": np.ones(1), "probs": np.ones((1, 2)), "softmax": np.array(True)}, "list of image names"),
        ({"keys": np.array(["x.png"]), "probs": np.ones((1, 2))}, "softmax"),
    ],
)
def test_a_file_that_is_not_a_save_probs_file_is_exit_10(tmp_path: Path, arrays: dict, message: str, capsys) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert main(["ensemble", str(path), "--output", str(tmp_path / "p.csv")]) == 10
    assert message in capsys.readouterr().err


def test_garbage_and_a_negative_topk_are_one_line(tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    assert main(["ensemble", str(garbage), "--output", str(tmp_path / "p.csv")]) == 10
    assert "is not a --save-probs file" in capsys.readouterr().err
    good = _save(tmp_path / "a.npz", ["x.png"], [[0.5, 0.5]])
    assert main(["ensemble", str(good), "--output", str(tmp_path / "p.csv"), "--topk", "-3"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_keys_saved_as_bytes_are_read_as_names(tmp_path: Path) -> None:
    """An .npz whose keys are bytes (written by another tool) names its images as text, never as `b'a.png'`."""
    path = tmp_path / "bytes.npz"
    names = np.array([b"a.png", "\u00e9t\u00e9.png".encode()])
    np.savez(path, keys=names, probs=np.array([[0.9, 0.1], [0.2, 0.8]]), softmax=np.array(True))
    output = tmp_path / "p.csv"
    assert main(["ensemble", str(path), "--output", str(output), "--topk", "1"]) == 0
    assert [row[0] for row in read_rows(output)] == ["a.png", "\u00e9t\u00e9.png"]
