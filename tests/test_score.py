"""`harness score` reproduces hand-computed numbers on small fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.results.writer import AtomicCsvWriter
from harness.tools.score import best_f1, kendall_tau_b, optimisation_score, overlap_ids, pearson, read_scores
from tests.helpers import shared_file


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_overlap_ids_are_the_official_113() -> None:
    official = json.loads(shared_file("objectnet-mappings", "objectnet_id_overlap.json").read_text())
    assert overlap_ids() == set(official.values()) and len(overlap_ids()) == 113


def test_objectnet_top1_top5_overall_and_on_the_overlap(tmp_path: Path, capsys) -> None:
    # ids 1 and 2 are overlap classes, 0 and 3 are not; d has no row and counts as wrong
    answers = _write(tmp_path / "answers.json", json.dumps({"a.png": 1, "b.png": 2, "c.png": 0, "d.png": 3}))
    predictions = _write(
        tmp_path / "p.csv",
        "a.png,1,.5,9,.1,9,.1,9,.1,9,.1\nsub/b.png,5,.5,2,.2,9,.1,9,.1,9,.1\nc.png,0,.9,,0,,0,,0,,0\n",
    )
    assert main(["score", str(predictions), "--answers", str(answers)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["all"] == {"top1": 50.0, "top5": 75.0, "images_scored": 3, "total_images": 4}
    assert result["overlap_113"] == {"top1": 50.0, "top5": 100.0, "images_scored": 2, "total_images": 2}


def test_a_row_outside_the_answers_is_refused_like_the_scorer_does(tmp_path: Path) -> None:
    answers = _write(tmp_path / "answers.json", json.dumps({"a.png": 1}))
    predictions = _write(tmp_path / "p.csv", "zz.png,1,.5,9,.1,9,.1,9,.1,9,.1\n")
    assert main(["score", str(predictions), "--answers", str(answers)]) == 9


def test_best_threshold_f1_by_hand() -> None:
    # thresholds 0.9..0.5 give F1 1/2, 2/5, 2/3, 6/7, 3/4
    f1, threshold = best_f1(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 1, 0]))
    assert f1 == pytest.approx(6 / 7) and threshold == 0.6
    # tied scores cannot be split by a threshold: 0.9 takes both (F1 1/2), 0.1 all three (F1 4/5)
    assert best_f1(np.array([0.9, 0.9, 0.1]), np.array([1, 0, 1])) == (pytest.approx(0.8), 0.1)


def test_f1_and_the_optimisation_score_from_the_cli(tmp_path: Path, capsys) -> None:
    scores = _write(tmp_path / "s.csv", "a.png,0.9\nb.png,0.8\nc.png,0.7\nd.png,0.6\ne.png,0.5\n")
    labels = _write(tmp_path / "l.json", json.dumps({"a.png": 1, "b.png": 0, "c.png": 1, "d.png": 1, "e.png": 0}))
    options = ["--macs", "1e8", "--baseline-f1", str(6 / 7), "--baseline-macs", "4e8"]
    assert main(["score", str(scores), "--labels", str(labels), *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["f1"] == pytest.approx(6 / 7) and result["threshold"] == 0.6
    assert result["optimisation_score"] == pytest.approx(2.0)  # same F1, a quarter of the MACs, weight 0.5
    assert optimisation_score(0.4, 2e8, 0.8, 2e8, 0.5) == pytest.approx(0.5)


def test_kendall_and_pearson_by_hand(tmp_path: Path, capsys) -> None:
    x, y = np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])
    assert kendall_tau_b(x, y) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant pair
    assert pearson(x, y) == pytest.approx(0.8)  # sum dx*dy = 4, sum dx^2 = sum dy^2 = 5
    first = _write(tmp_path / "a.csv", "a.png,1\nb.png,2\nc.png,3\nd.png,4\n")
    second = _write(tmp_path / "b.csv", "d.png,4\nc.png,2\nb.png,3\na.png,1\n")
    assert main(["score", str(first), "--compare", str(second)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kendall_tau_b"] == pytest.approx(4 / 6) and result["pearson_r"] == pytest.approx(0.8)


def test_kendall_tau_b_with_ties_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 1000).astype(float), rng.integers(0, 5, 1000).astype(float)
    y[:500] = x[:500]
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_score_files_keyed_by_any_file_name_are_read(tmp_path: Path) -> None:
    """A run writes file names that are not UTF-8 as their original bytes; the tools read them back."""
    names = ["a.png", "bad-\udcff.png", "cr\rname.png", "d.png"]
    paths = []
    for name, values in (("a.csv", [1, 2, 3, 4]), ("b.csv", [1, 3, 2, 4])):
        with AtomicCsvWriter(tmp_path / name) as writer:
            for key, value in zip(names, values, strict=True):
                writer.write([key, str(value)])
            writer.commit()
        paths.append(tmp_path / name)
    assert read_scores(paths[0]) == dict(zip(names, [1.0, 2.0, 3.0, 4.0], strict=True))
    assert main(["score", str(paths[0]), "--compare", str(paths[1])]) == 0


@pytest.mark.parametrize("answer", ['"banana"', "null", "true", "1.5", "[1]", '"²"', '"5"', "313", "-1"])
def test_an_answer_that_is_not_an_objectnet_id_is_exit_10(tmp_path: Path, answer: str, capsys) -> None:
    answers = _write(tmp_path / "answers.json", '{"a.png": ' + answer + "}")
    predictions = _write(tmp_path / "p.csv", "a.png,1,.5,9,.1,9,.1,9,.1,9,.1\n")
    assert main(["score", str(predictions), "--answers", str(answers)]) == 10
    said = capsys.readouterr().err.strip().splitlines()
    assert (
        f"the answer for a.png is {json.dumps(json.loads(answer), ensure_ascii=False)}, not an ObjectNet id" in said[-1]
    )
    assert len(said) == 1 and "Traceback" not in said[0]


def test_an_undefined_correlation_is_null_never_nan(tmp_path: Path, capsys) -> None:
    first = _write(tmp_path / "a.csv", "a.png,1\nb.png,1\n")
    second = _write(tmp_path / "b.csv", "a.png,2\nb.png,3\n")
    assert main(["score", str(first), "--compare", str(second)]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and json.loads(text)["kendall_tau_b"] is None


@pytest.mark.parametrize(
    "argv",
    [
        ["check-model", "--max-params", "nan"],
        ["check-model", "--max-gflops", "inf"],
        ["check-model", "--max-gmacs", "-1"],
        ["export-onnx", "--tolerance", "nan"],
        ["score", "p.csv", "--labels", "l.json", "--macs", "nan"],
    ],
)
def test_a_limit_that_is_not_a_finite_positive_number_is_exit_2(argv: list[str], capsys) -> None:
    assert main(argv) == 2
    assert "give a finite number above 0" in capsys.readouterr().err
