"""`harness validate`: check a predictions CSV the way the ObjectNet scorer will, before it is submitted.

The scorer rejects a whole file for one bad row and says little about where; this reports every problem with
its line number, by the rules in harness/results/contract.py. With `--images`, it also lists the images that have
no row (the scorer counts each as wrong) and rows for files that are not there.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from harness.errors import CheckFailedError, ToolFileError
from harness.pipeline.files import discover
from harness.results.contract import problems, scorer_key
from harness.results.writer import read_rows

MAX_REPORTED = 50  # problems listed before the rest are only counted


def read_predictions_file(csv_path: Path) -> list[list[str]]:
    """The rows of a CSV handed to a tool, through the contract's one reader."""
    try:
        return read_rows(csv_path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ToolFileError(f"cannot read {csv_path}: {error}") from None


def validate_predictions(csv_path: Path, images_dir: Path | None = None) -> tuple[int, list[str], list[str]]:
    """(rows read, reasons the scorer would reject the file, images it would score as wrong for want of a row
    or rows it would not score); neither list means the scorer accepts the file and scores every image."""
    rows = read_predictions_file(csv_path)
    rejected, first_line = problems(rows)
    coverage = _coverage_problems(first_line, images_dir) if images_dir is not None else []
    return len(rows), rejected, coverage


def _coverage_problems(first_line: dict[str, int], images_dir: Path) -> list[str]:
    counts = Counter(scorer_key(image.key) for image in discover(images_dir))
    found = [
        f"image {name} appears more than once in {images_dir}: the scorer matches by basename"
        for name, count in sorted(counts.items())
        if count > 1
    ]
    expected = set(counts)
    found += [f"missing image: {name} has no row (scored as wrong)" for name in sorted(expected - set(first_line))]
    found += [
        f"line {line}: key {key} is not an image in {images_dir}"
        for key, line in sorted(first_line.items(), key=lambda item: item[1])
        if key not in expected
    ]
    return found


def validate_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="harness validate", description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="the predictions CSV")
    parser.add_argument("--images", type=Path, help="the image folder: every image must have exactly one row")
    args = parser.parse_args(argv)
    count, rejected, coverage = validate_predictions(args.predictions, args.images)
    found = rejected + coverage
    for problem in found[:MAX_REPORTED]:
        print(problem, file=sys.stderr)
    if found:
        more = f" ({len(found) - MAX_REPORTED} more not shown)" if len(found) > MAX_REPORTED else ""
        verdict = (
            "the scorer would reject the file"
            if rejected
            else "the scorer would accept the file but not score every image as you expect"
        )
        raise CheckFailedError(f"{args.predictions}: {len(found)} problem(s){more}; {verdict}")
    covered = f", every image in {args.images} exactly once" if args.images else ""
    print(f"harness: {args.predictions} is valid: {count} rows{covered}")
    return 0
