"""The challenge's predictions contract in one place: how its scorer reads a predictions CSV and which files it
accepts. `harness validate`, `harness score` and every run's own check of the CSV it committed read rows through
`read_rows` (harness/results/writer.py, the one reader of the harness's CSV dialect, as it is the one writer) and
judge them by `problems`, so the three can never disagree.

The rules (the ObjectNet scorer's), held by every file of its shape (`scorer_shaped`): no header,
`key,id1,conf1,...,id5,conf5`, ids in -1..312 read as `int()` reads them (empty counts as -1), rows matched by the
key's basename, a duplicate key rejects the file, and so does a row that is not 11 fields (an empty line too: a
trailing blank line rejects the file); a missing image is scored as wrong.
"""

from __future__ import annotations

import csv
import math
import posixpath
from pathlib import Path

from harness.results.label_maps import OBJECTNET_TOPK
from harness.results.rows import Layout
from harness.results.writer import read_rows

ID_MIN, ID_MAX = -1, 312
TOPK = OBJECTNET_TOPK
SCORER_LAYOUT = Layout(TOPK)
BYTE_ORDER_MARK = "\ufeff"


def scorer_key(key: str) -> str:
    """The scorer keeps only the basename (`os.path.split(row[0])[1]` on Linux: '/' separates, '\\' does not)."""
    return posixpath.basename(key)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def scorer_id(text: str) -> int:
    """An id field as the scorer reads it: empty is -1, anything else goes through int() as it stands (which takes
    ' 5' and '+5', and refuses ' ' and '5.0'). ValueError where the scorer would reject the file."""
    return -1 if text == "" else int(text)


def is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def row_problems(row: list[str], line: int) -> list[str]:
    if not row or not row[0]:
        return [f"line {line}: empty row or empty key (a blank line, e.g. at the end of the file, counts)"]
    try:
        parts = SCORER_LAYOUT.split(row)
    except ValueError as error:
        hint = " (a header row?)" if line == 1 and row and not _is_int(row[1] if len(row) > 1 else "") else ""
        return [f"line {line}: {error} (key and {TOPK} id,confidence pairs){hint}"]
    problems = []
    for pair, (text, confidence_text) in enumerate(zip(parts.ids, parts.scores, strict=True)):
        column, confidence = 2 + 2 * pair, confidence_text.strip()
        try:
            number = scorer_id(text)
        except ValueError:
            hint = " (a header row?)" if line == 1 else ""
            problems.append(f"line {line}, column {column}: id {text!r} is not an integer as the scorer reads it{hint}")
        else:
            if not ID_MIN <= number <= ID_MAX:
                problems.append(f"line {line}, column {column}: id {text} is outside {ID_MIN}..{ID_MAX}")
        if not is_finite_number(confidence):
            problems.append(f"line {line}, column {column + 1}: confidence {confidence!r} is not a finite number")
    return problems


def problems(rows: list[list[str]]) -> tuple[list[str], dict[str, int]]:
    """(every reason the scorer would reject the file, the line of each key's row)."""
    found: list[str] = []
    if rows and rows[0] and rows[0][0].startswith(BYTE_ORDER_MARK):
        found.append(
            "line 1: the file starts with a UTF-8 byte-order mark, which the scorer reads as part of the first "
            "image's name: save it as UTF-8 without BOM"
        )
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        found += row_problems(row, line)
        if not row or not row[0]:
            continue
        key = scorer_key(row[0])
        if key in first_line:
            found.append(f"line {line}: duplicate key {key} (first on line {first_line[key]}); the scorer rejects it")
        else:
            first_line[key] = line
    return found, first_line


def scorer_shaped(columns: int, scorer_ids: bool) -> bool:
    """Whether a file is the challenge's by its shape: five (id, confidence) pairs a row, of ids the scorer takes
    (harness/results/labels.py: scorer_ids), whatever the label map that wrote it is called."""
    return columns == SCORER_LAYOUT.columns and scorer_ids


def committed_problems(path: Path, keys: list[str], columns: int, scorer_rules: bool) -> list[str]:
    """Why a run's committed CSV is not right to submit: not exactly one row per image in input order, a row of
    the wrong width, a confidence that is not a finite number; and for a file of the challenge's shape
    (`scorer_rules`, scorer_shaped), any rule of the scorer (two images sharing a basename in different folders,
    say)."""
    try:
        rows = read_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return [f"it cannot be read back: {error}"]
    written = [row[0] if row else "" for row in rows]
    if written != keys:
        pairs = zip(written, keys, strict=False)  # a shorter list ends the search: the difference is its end
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(written), len(keys)))
        got = repr(written[first]) if first < len(written) else "the end of the file"
        want = repr(keys[first]) if first < len(keys) else "the end of the file"
        return [f"it holds {len(written)} rows for {len(keys)} images; line {first + 1} is {got}, expected {want}"]
    found = []
    layout = Layout.of_columns(columns)
    for line, row in enumerate(rows, start=1):
        try:
            scores = layout.split(row).scores
        except ValueError as error:
            found.append(f"line {line}: {error}")
            continue
        if not layout.is_failure(row) and not all(is_finite_number(score) for score in scores):
            found.append(f"line {line}: a confidence that is not a finite number")
    if scorer_rules:
        found += problems(rows)[0]
    return found
