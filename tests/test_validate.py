"""`harness validate` catches each kind of CSV the ObjectNet scorer would reject or score wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.results.contract import committed_problems, problems, row_problems, scorer_id
from harness.tools.validate import validate_predictions


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    for name in names:
        (folder / f"{name}.png").write_bytes(b"")  # validate only looks at names
    return folder


def _row(key: str, first_id: str = "5") -> str:
    return f"{key}.png,{first_id},0.5,6,0.2,7,0.1,8,0.1,-1,0.05"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return _images(tmp_path / "images", ["a", "b", "c"])


def _check(tmp_path: Path, images: Path, lines: list[str]) -> list[str]:
    path = tmp_path / "predictions.csv"
    path.write_text("\n".join(lines) + "\n")
    _, rejected, coverage = validate_predictions(path, images)
    return rejected + coverage


def test_a_good_file_passes_and_the_cli_exits_0(tmp_path: Path, images: Path, capsys) -> None:
    assert _check(tmp_path, images, [_row("a"), _row("b"), _row("c", "")]) == []
    assert main(["validate", str(tmp_path / "predictions.csv"), "--images", str(images)]) == 0
    assert "valid: 3 rows" in capsys.readouterr().out


def test_header_is_caught_on_line_1(tmp_path: Path, images: Path) -> None:
    header = "key,id1,conf1,id2,conf2,id3,conf3,id4,conf4,id5,conf5"
    problems = _check(tmp_path, images, [header, _row("a"), _row("b"), _row("c")])
    assert problems and all(p.startswith("line 1") for p in problems) and "header" in problems[0]


def test_duplicates_are_caught_by_basename(tmp_path: Path, images: Path) -> None:
    problems = _check(tmp_path, images, [_row("a"), _row("b"), _row("c"), _row("sub/a")])
    assert problems == ["line 4: duplicate key a.png (first on line 1); the scorer rejects it"]


def test_missing_and_unknown_images_are_caught(tmp_path: Path, images: Path) -> None:
    problems = _check(tmp_path, images, [_row("a"), _row("b"), _row("zzz")])
    assert problems == [
        "missing image: c.png has no row (scored as wrong)",
        "line 3: key zzz.png is not an image in " + str(images),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("313", "line 2, column 2: id 313 is outside -1..312"),
        ("-2", "outside"),
        ("3.5", "not an integer"),
        (" ", "id ' ' is not an integer as the scorer reads it"),  # the scorer's int(' ') rejects the file
        ("\u0663x", "not an integer"),
    ],
)
def test_bad_ids_are_caught(tmp_path: Path, images: Path, bad: str, message: str) -> None:
    problems = _check(tmp_path, images, [_row("a"), _row("b", bad), _row("c")])
    assert len(problems) == 1 and message in problems[0] and problems[0].startswith("line 2")


def test_ids_are_read_as_the_scorers_int_reads_them(tmp_path: Path, images: Path) -> None:
    """' 5', '+5' and an Arabic-Indic five are 5 to the scorer's int(); an empty id is -1."""
    assert _check(tmp_path, images, [_row("a", " 5"), _row("b", "+5"), _row("c", "\u0665")]) == []


def test_wrong_column_count_and_bad_confidence(tmp_path: Path, images: Path) -> None:
    problems = _check(tmp_path, images, [_row("a") + ",9", _row("b").replace("0.2", "nan"), _row("c")])
    assert problems[0].startswith("line 1: 12 columns, expected 11")
    assert problems[1] == "line 2, column 5: confidence 'nan' is not a finite number"


@pytest.mark.parametrize("pairs", [4, 6])
def test_a_row_of_another_number_of_pairs_is_refused_whatever_its_width_says(
    tmp_path: Path, images: Path, pairs: int
) -> None:
    """The scorer reads five pairs a row: four (9 fields) or six (13) reject the file, a width that is itself a
    whole number of pairs included."""
    row = "a.png," + ",".join(["5", "0.5"] * pairs)
    problems = _check(tmp_path, images, [row, _row("b"), _row("c")])
    assert problems == [f"line 1: {1 + 2 * pairs} columns, expected 11 (key and 5 id,confidence pairs)"]


def test_the_cli_exits_8_with_one_line_per_problem(tmp_path: Path, images: Path, capsys) -> None:
    path = tmp_path / "predictions.csv"
    path.write_text(_row("a") + "\n" + _row("a") + "\n")
    assert main(["validate", str(path), "--images", str(images)]) == 9
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("line 2: duplicate key a.png")
    assert err[-1].startswith("harness: error: ") and "3 problem(s)" in err[-1]


@pytest.mark.slow
def test_the_harness_own_output_validates(harness_run, tmp_path: Path) -> None:
    code, _ = harness_run("--batch-size", "19")
    assert code == 0
    assert validate_predictions(tmp_path / "predictions.csv", Path("sample-images"))[1:] == ([], [])


def test_an_id_is_read_as_the_scorer_reads_it_an_empty_one_as_minus_one() -> None:
    assert [scorer_id(text) for text in ("", "0", " 5", "+5", "312")] == [-1, 0, 5, 5, 312]
    for text in (" ", "5.0", "x"):
        with pytest.raises(ValueError):
            scorer_id(text)


@pytest.mark.parametrize(
    ("row", "line", "hint"),
    [
        (["filename", "label"], 1, True),  # a header: the first row, a word where an id goes
        (["filename"], 1, True),  # a header of one field
        (["filename", "label"], 2, False),  # the same below the first line is no header
        (["a.png", "5", "0.9"], 1, False),  # a short row of data: an id where an id goes
        (["a.png", "5"], 1, False),  # and one of two fields
    ],
)
def test_a_row_of_the_wrong_width_is_called_a_header_only_where_it_looks_like_one(
    row: list[str], line: int, hint: bool
) -> None:
    expected = f"line {line}: {len(row)} columns, expected 11 (key and 5 id,confidence pairs)"
    assert row_problems(row, line) == [expected + (" (a header row?)" if hint else "")]


@pytest.mark.parametrize(("line", "hint"), [(1, " (a header row?)"), (2, "")])
def test_a_word_for_an_id_is_called_a_header_only_on_the_first_line(line: int, hint: str) -> None:
    row = ["a.png", "x", "0.5", *["1", "0.1"] * 4]
    assert row_problems(row, line) == [f"line {line}, column 2: id 'x' is not an integer as the scorer reads it{hint}"]


def test_the_ends_of_the_id_range_are_ids() -> None:
    assert row_problems(["a.png", "312", "0.5", "-1", "0", *["0", "0.1"] * 3], 1) == []


def test_a_byte_order_mark_is_named_with_the_fix() -> None:
    found, lines = problems([["\ufeffa.png", *["1", "0.5"] * 5]])
    assert found == [
        "line 1: the file starts with a UTF-8 byte-order mark, which the scorer reads as part of the first image's "
        "name: save it as UTF-8 without BOM"
    ]
    assert lines == {"\ufeffa.png": 1}


def test_a_blank_row_ends_no_search_for_duplicates() -> None:
    row = ["a.png", *["1", "0.5"] * 5]
    found, _ = problems([row, [], row])
    assert found[-1] == "line 3: duplicate key a.png (first on line 1); the scorer rejects it"


def test_a_committed_file_with_a_blank_line_is_not_one_row_per_image(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("a.png," + ",".join(["1", "0.5"] * 5) + "\n\n")
    assert committed_problems(path, ["a.png"], 11, scorer_rules=True) == [
        "it holds 2 rows for 1 images; line 2 is '', expected the end of the file"
    ]


@pytest.mark.parametrize(
    ("written", "said"),
    [
        (["b.png", "a.png"], "it holds 2 rows for 2 images; line 1 is 'b.png', expected 'a.png'"),
        (["a.png"], "it holds 1 rows for 2 images; line 2 is the end of the file, expected 'b.png'"),
    ],
)
def test_a_committed_file_names_its_first_row_out_of_place(tmp_path: Path, written: list[str], said: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text("".join(key + "," + ",".join(["1", "0.5"] * 5) + "\n" for key in written))
    assert committed_problems(path, ["a.png", "b.png"], 11, scorer_rules=True) == [said]


def test_a_committed_file_lists_every_bad_row_by_its_line_then_the_scorers_own_reasons(tmp_path: Path) -> None:
    """Rows in order, each problem once with its line (a too-narrow row, confidences that are not finite numbers,
    text among them), a failure row's confidence never judged, and the scorer's reasons after them."""
    good = ["1", "0.5"] * 5
    rows = [
        ["a.png", *good[:-2]],  # line 1: 9 fields
        ["b.png", *good[:-1], "nan"],
        ["c.png", *good[:-1], "inf"],
        ["d.png", *good[:-1], "high"],
        ["e.png", *["", "0"] * 5],  # a failure row
        ["dir/f.png", *good],
        ["f.png", *good],
    ]
    path = tmp_path / "p.csv"
    path.write_text("".join(",".join(row) + "\n" for row in rows))
    keys = [row[0] for row in rows]
    expected = [
        "line 1: 9 columns, expected 11",
        "line 2: a confidence that is not a finite number",
        "line 3: a confidence that is not a finite number",
        "line 4: a confidence that is not a finite number",
    ]
    assert committed_problems(path, keys, 11, scorer_rules=False) == expected
    scorers = problems(rows)[0]
    assert len(scorers) >= 2 and committed_problems(path, keys, 11, scorer_rules=True) == expected + scorers


def test_only_a_finite_number_is_a_confidence() -> None:
    from harness.results.contract import is_finite_number

    assert [is_finite_number(text) for text in ("0.5", "1e-3", "-2", "nan", "inf", "-inf", "high", "")] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_a_one_score_file_is_read_as_key_and_score(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("a.png,0.25\nb.png,\nc.png,nan\n")  # a score, a failed image's empty one, no number
    assert committed_problems(path, ["a.png", "b.png", "c.png"], 2, scorer_rules=False) == [
        "line 3: a confidence that is not a finite number"
    ]
