"""`harness validate`: check a predictions CSV the way the ObjectNet scorer will, before it is submitted.

The scorer rejects a whole file for one bad row and says little about where; this reports every problem with
its line number. Its rules: no header, `key,id1,conf1,...,id5,conf5`, ids in -1..312 (empty counts as -1), rows
matched by the key's basename, a duplicate key rejects the file, a missing image counts as wrong.
"""

from __future__ import annotations

import argparse
import csv
import math
import posixpath
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from harness.errors import CheckFailedError, ToolFileError
from harness.pipeline.files import discover
from harness.results.writer import open_csv

ID_MIN, ID_MAX = -1, 312
TOPK = 5
COLUMNS = 1 + 2 * TOPK
MAX_REPORTED = 50  # problems listed before the rest are only counted


def scorer_key(key: str) -> str:
    """The scorer keeps only the basename (`os.path.split(row[0])[1]` on Linux: '/' separates, '\\' does not)."""
    return posixpath.basename(key)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _row_problems(row: list[str], line: int) -> list[str]:
    if len(row) != COLUMNS:
        hint = " (a header row?)" if line == 1 and row and not _is_int(row[1] if len(row) > 1 else "") else ""
        return [f"line {line}: {len(row)} columns, expected {COLUMNS} (key and {TOPK} id,confidence pairs){hint}"]
    problems = []
    for column in range(1, COLUMNS, 2):
        text = row[column].strip()
        if text and not _is_int(text):
            hint = " (a header row?)" if line == 1 else ""
            problems.append(f"line {line}, column {column + 1}: id {text!r} is not an integer{hint}")
        elif text and not ID_MIN <= int(text) <= ID_MAX:
            problems.append(f"line {line}, column {column + 1}: id {text} is outside {ID_MIN}..{ID_MAX}")
        confidence = row[column + 1].strip()
        try:
            finite = math.isfinite(float(confidence))
        except ValueError:
            finite = False
        if not finite:
            problems.append(f"line {line}, column {column + 2}: confidence {confidence!r} is not a finite number")
    return problems


def validate_predictions(csv_path: Path, images_dir: Path | None = None) -> tuple[int, list[str]]:
    """(rows read, problems); no problems means the scorer will accept the file and score every image."""
    try:
        with open_csv(csv_path) as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ToolFileError(f"cannot read {csv_path}: {error}") from None
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        if not row or not row[0]:
            problems.append(f"line {line}: empty row or empty key")
            continue
        problems += _row_problems(row, line)
        key = scorer_key(row[0])
        if key in first_line:
            problems.append(
                f"line {line}: duplicate key {key} (first on line {first_line[key]}); the scorer rejects the file"
            )
        else:
            first_line[key] = line
    if images_dir is not None:
        problems += _coverage_problems(first_line, images_dir)
    return len(rows), problems


def _coverage_problems(first_line: dict[str, int], images_dir: Path) -> list[str]:
    counts = Counter(scorer_key(image.key) for image in discover(images_dir))
    problems = [
        f"image {name} appears more than once in {images_dir}: the scorer matches by basename"
        for name, count in sorted(counts.items())
        if count > 1
    ]
    expected = set(counts)
    problems += [f"missing image: {name} has no row" for name in sorted(expected - set(first_line))]
    problems += [
        f"line {line}: key {key} is not an image in {images_dir}"
        for key, line in sorted(first_line.items(), key=lambda item: item[1])
        if key not in expected
    ]
    return problems


def validate_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="harness validate", description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="the predictions CSV")
    parser.add_argument("--images", type=Path, help="the image folder: every image must have exactly one row")
    args = parser.parse_args(argv)
    count, problems = validate_predictions(args.predictions, args.images)
    for problem in problems[:MAX_REPORTED]:
        print(problem, file=sys.stderr)
    if problems:
        more = f" ({len(problems) - MAX_REPORTED} more not shown)" if len(problems) > MAX_REPORTED else ""
        raise CheckFailedError(f"{args.predictions}: {len(problems)} problem(s){more}; the scorer would reject it")
    covered = f", every image in {args.images} exactly once" if args.images else ""
    print(f"harness: {args.predictions} is valid: {count} rows{covered}")
    return 0
