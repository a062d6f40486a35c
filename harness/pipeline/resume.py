"""Continuing an interrupted run from the rows its .partial file kept.

Rows are written in input order, so a partial file is a prefix of the final one. Resuming keeps that prefix, cut
back to a batch boundary: each later batch then holds the same images as in an uninterrupted run, and the model
gives the same numbers, so the final CSV is byte-identical to one written in a single go.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from harness.errors import ConfigError
from harness.results.writer import open_csv, partial_path, row_writer


def _read_rows(path: Path) -> tuple[list[list[str]], bool]:
    """Rows of a CSV that may end mid-row, and whether its last row is whole (the file ends with a newline)."""
    with open_csv(path) as f:
        text = f.read()
    rows: list[list[str]] = []
    try:
        rows.extend(csv.reader(io.StringIO(text, newline="")))  # not splitlines(): names may hold \x0c etc.
    except csv.Error:  # an unterminated quote at the very end: the row was cut mid-write
        return rows, False
    return rows, text.endswith("\n")


def _rewrite(path: Path, rows: list[list[str]]) -> None:
    with open_csv(path, "w") as f:
        write = row_writer(f)  # the writer's own dialect, so kept rows stay byte for byte what was written
        for row in rows:
            write(row)


def resume_point(output: Path, errors: Path, keys: list[str], row_width: int, batch_size: int) -> tuple[int, int]:
    """Leave the partial files holding exactly the rows to keep; return (rows kept, failures among them)."""
    partial = partial_path(output)
    if not partial.exists():
        return 0, 0
    rows, last_whole = _read_rows(partial)
    if rows and not last_whole:
        rows.pop()
    for position, row in enumerate(rows):
        if position >= len(keys) or row[0] != keys[position] or len(row) != row_width:
            shown = row[0] if row else "an empty row"
            expected = keys[position] if position < len(keys) else "no more images"
            raise ConfigError(
                f"--resume: {partial} does not belong to this run: row {position + 1} is {shown!r} with "
                f"{len(row)} fields, expected {expected!r} with {row_width}. Delete it, or run without --resume to "
                "start over."
            )
    kept = len(rows) - len(rows) % batch_size
    _rewrite(partial, rows[:kept])
    done = set(keys[:kept])
    failures = 0
    errors_partial = partial_path(errors)
    if errors_partial.exists():
        error_rows = [row for row in _read_rows(errors_partial)[0] if len(row) == 2 and row[0] in done]
        _rewrite(errors_partial, error_rows)
        failures = len(error_rows)
    else:
        _rewrite(errors_partial, [])
    return kept, failures
