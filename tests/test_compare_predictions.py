"""tests/helpers.py's comparison of two predictions CSVs, which the golden, container and equivalence tests trust."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import compare_predictions


def _write(folder: Path, name: str, rows: list[list[str]]) -> Path:
    path = folder / name
    path.write_text("".join(",".join(row) + "\n" for row in rows), encoding="utf-8")
    return path


ROWS = [["a.png", "1", "0.900000", "2", "0.100000"], ["b.png", "3", "0.500000", "4", "0.400000"]]


def test_noise_within_the_tolerance_agrees_and_beyond_it_is_named(tmp_path: Path) -> None:
    expected = _write(tmp_path, "expected.csv", ROWS)
    noise = _write(tmp_path, "noise.csv", [ROWS[0], ["b.png", "3", "0.500050", "4", "0.4"]])
    assert compare_predictions(expected, noise, 1e-4) == []
    (far,) = compare_predictions(expected, noise, 1e-5)
    assert "confidences differ by up to 5.00e-05 (more than 1e-05), in b.png" in far


def test_other_ids_are_a_difference_unless_their_confidences_tie(tmp_path: Path) -> None:
    expected = _write(tmp_path, "expected.csv", ROWS)
    (ids,) = compare_predictions(expected, _write(tmp_path, "ids.csv", [ROWS[0], ["b.png", "4", "0.5", "3", "0.4"]]))
    assert ids.startswith("b.png: class ids ['3', '4'] vs ['4', '3']")
    tied = [["c.png", "7", "0.300001", "8", "0.300000", "9", "0.1"]]
    swapped = [["c.png", "8", "0.300001", "7", "0.300000", "9", "0.1"]]
    assert compare_predictions(_write(tmp_path, "t.csv", tied), _write(tmp_path, "s.csv", swapped)) == []
    beyond = [["c.png", "7", "0.300001", "9", "0.300000", "8", "0.1"]]  # the tie's ids, but not the tie's slots
    (problem,) = compare_predictions(_write(tmp_path, "t2.csv", tied), _write(tmp_path, "b.csv", beyond))
    assert problem.startswith("c.png: class ids")


def test_missing_rows_failure_rows_and_an_empty_file(tmp_path: Path) -> None:
    expected = _write(tmp_path, "expected.csv", ROWS)
    (keys,) = compare_predictions(expected, _write(tmp_path, "short.csv", ROWS[:1]))
    assert "missing ['b.png']" in keys
    failed = [["a.png", "", "0", "", "0"]]
    assert compare_predictions(_write(tmp_path, "f1.csv", failed), _write(tmp_path, "f2.csv", failed)) == []
    row, confidences = compare_predictions(_write(tmp_path, "f3.csv", failed), _write(tmp_path, "f4.csv", ROWS[:1]))
    assert row.startswith("a.png: class ids") and "up to 9.00e-01" in confidences
    empty = _write(tmp_path, "empty.csv", [])
    assert compare_predictions(empty, empty) == [f"{empty} has no rows"]
