"""Streamed, atomic CSV output: rows go to `<name>.partial` as they come and the file is renamed into place only
when complete, so the final name never holds half a file and a crash keeps every finished row.

File names are written with `surrogateescape`, so names that are not valid UTF-8 keep their original bytes.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from harness.errors import OutputError


def open_csv(path: Path, mode: str = "r") -> TextIO:
    """A predictions or errors CSV, read or written: UTF-8, file names' undecodable bytes kept as they were, and
    line endings left to the csv module."""
    return open(path, mode, newline="", encoding="utf-8", errors="surrogateescape")


def row_writer(file: TextIO) -> Callable[[list[str]], None]:
    """Writes one row in the harness's CSV dialect.

    csv quotes a field with "\n" (the line terminator) but not one with a lone "\r", which readers take as a line
    break; such rows (a file name can hold any byte) are written fully quoted.
    """
    plain = csv.writer(file, lineterminator="\n")
    quoted = csv.writer(file, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def write(row: list[str]) -> None:
        (quoted if any("\r" in field for field in row) else plain).writerow(row)

    return write


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def check_writable(path: Path) -> None:
    """Fail before any model work if the output folder cannot take the file."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output folder {folder}: {error.strerror}") from None
    if path.is_dir():
        raise OutputError(f"output {path} is a folder: pass a file name such as {path / 'predictions.csv'}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable by this user (uid {os.getuid()})")


class AtomicCsvWriter:
    """Rows to a partial file (appended to when resuming); `flush` hands them to the OS, `commit` makes the
    partial file the real one."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        self.partial = partial_path(path)
        try:
            # Held open for the whole run, so no `with`: commit() or abandon() closes it.
            self._file = open_csv(self.partial, "a" if append else "w")
        except OSError as error:
            raise OutputError(f"cannot write {self.partial}: {error.strerror}") from None
        self.write = row_writer(self._file)

    def flush(self) -> None:
        """Once per batch: a killed process (even SIGKILL) then loses at most the batch in flight."""
        self._file.flush()

    def commit(self) -> None:
        """Flush to disk, then rename: readers see the old file or the whole new one, never a mix."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        _fsync_folder(self.path.parent)

    def abandon(self) -> None:
        """Keep what was written in the partial file (finished rows are never lost) and let go of it."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> AtomicCsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abandon()


def write_atomic_text(path: Path, text: str) -> None:
    """A small file (run.json) written whole, through the same partial-then-rename step."""
    partial = partial_path(path)
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
