"""Streamed, atomic CSV output: rows go to `<name>.partial` a whole batch at a time and the file is renamed into
place only when complete, so the final name never holds half a file and a crash keeps every finished batch. Every
output file is opened, renamed and removed through the gate (harness/results/gate.py).

A write that fails (a full disk, a quota) cuts the partial file back to its last whole batch, so `--resume` goes
on from there. One run per output folder: a second run on the same folder is refused at once. File names are
written with `surrogateescape`, so names that are not valid UTF-8 keep their original bytes.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from harness.errors import OutputError
from harness.results.gate import open_output, partial_path, remove_output, replace_output, sync_folder

ENCODING = "utf-8"
ERRORS = "surrogateescape"


FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}


def open_csv(path: Path, mode: str = "r") -> TextIO:
    """A predictions or errors CSV, read or written through the gate: UTF-8, file names' undecodable bytes kept as
    they were, and line endings left to the csv module."""
    return os.fdopen(open_output(path, FLAGS[mode]), mode, newline="", encoding=ENCODING, errors=ERRORS)


def row_writer(file: TextIO) -> Callable[[list[str]], None]:
    """Writes one row in the harness's CSV dialect.

    csv quotes a field with "\\n" (the line terminator) but not one with a lone "\\r", which readers take as a line
    break; such rows (a file name can hold any byte) are written fully quoted.
    """
    plain = csv.writer(file, lineterminator="\n")
    quoted = csv.writer(file, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def write(row: list[str]) -> None:
        (quoted if any("\r" in field for field in row) else plain).writerow(row)

    return write


def iter_rows(path: Path) -> Iterator[list[str]]:
    """Every row of a CSV in this dialect, as the scorer's csv reader sees it, blank lines included (as empty
    rows), one at a time (a torchrun merge of millions of rows holds none of them). Raises OSError,
    UnicodeDecodeError or csv.Error when the file cannot be read as a CSV."""
    with open_csv(path) as f:
        yield from csv.reader(f)


def read_rows(path: Path) -> list[list[str]]:
    """iter_rows' rows, all at once."""
    return list(iter_rows(path))


def read_cut_rows(path: Path) -> tuple[list[list[str]], bool]:
    """Rows of a CSV that may end mid-row (an interrupted run's), and whether its last row is whole (the file ends
    with a newline)."""
    with open_csv(path) as f:
        text = f.read()
    rows: list[list[str]] = []
    try:
        rows.extend(csv.reader(io.StringIO(text, newline="")))  # not splitlines(): names may hold \x0c etc.
    except csv.Error:  # an unterminated quote at the very end: the row was cut mid-write
        return rows, False
    return rows, text.endswith("\n")


def _space_left(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free on {folder}"
    except OSError:
        return f"free space on {folder} unknown"


def write_failed(path: Path, error: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {error.strerror or error} ({_space_left(path.parent)})")


def check_writable(path: Path, *beside: Path, suffix: str = ".csv", what: str = "the predictions go to a CSV") -> None:
    """Fail before any model work if the output folder cannot take the file, or the files written beside it; and
    never replace what is not a file the harness writes: the output must be named with `suffix`, and an existing
    output (or a file beside it) must be a regular file, not a folder, a device, a link or a pipe (renamed over,
    /dev/null or an input photo given as the output would be lost)."""
    example = f"such as {'predictions' if suffix == '.csv' else 'model'}{suffix}"
    if path.is_dir():
        raise OutputError(f"output {path} is a folder: pass a file name {example}")
    if path.suffix.lower() != suffix:
        raise OutputError(
            f"output {path} is not a {suffix} file name: {what} ({example}), and a file of another kind there "
            "would be replaced"
        )
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output folder {folder}: {error.strerror}") from None
    for other in (path, partial_path(path), *beside, *map(partial_path, beside)):
        if other.is_dir() and not other.is_symlink():
            raise OutputError(f"{other} is a folder, where the run writes a file: move it away")
        if other.is_symlink() or (other.exists() and not stat.S_ISREG(other.stat().st_mode)):
            raise OutputError(f"{other} exists and is not a regular file (a link, a device, a pipe): move it away")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable by this user (uid {os.getuid()})")


_LOCKS: set[int] = set()  # descriptors holding an output folder in this process


def _drop_inherited_locks() -> None:
    """In a forked child (a decoder): let go of the parent's lock descriptors, so that the lock ends with the
    process that took it, even when it is killed and its decoders linger for a moment."""
    for fd in list(_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def output_folder_lock(folder: Path) -> Iterator[None]:
    """Hold the output folder while the run writes (the kernel lets go if the process dies): predictions,
    errors.csv and run.json of two runs in one folder would overwrite each other, so a second run is refused."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise OutputError(f"cannot open output folder {folder}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"another harness run is writing to {folder}: wait for it to finish, or choose another output folder"
            ) from None
        _LOCKS.add(fd)
        yield
    finally:
        _LOCKS.discard(fd)
        os.close(fd)


class AtomicCsvWriter:
    """Rows to a partial file (appended to when resuming). `flush` writes the rows since the last flush as one
    whole batch, or none of them; `commit` makes the partial file the real one."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        self.partial = partial_path(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        try:
            # Held open for the whole run, so no `with`: commit() or abandon() closes it.
            self._fd: int | None = open_output(self.partial, flags)
            self.whole = os.lseek(self._fd, 0, os.SEEK_END)  # bytes of whole batches in the file
        except OSError as error:
            raise write_failed(self.partial, error) from None
        self._rows = io.StringIO(newline="")
        self.write = row_writer(self._rows)

    def flush(self) -> None:
        """Once per batch: a killed process (even SIGKILL) then loses at most the batch in flight; a failed write
        leaves the file as it was before this batch."""
        data = self._rows.getvalue().encode(ENCODING, ERRORS)
        self._rows.seek(0)
        self._rows.truncate()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
        except OSError as error:
            self.truncate(self.whole)
            raise write_failed(self.partial, error) from None
        self.whole += len(data)

    def truncate(self, size: int) -> None:
        """Cut the file back to `size` bytes (a batch boundary another writer's failure undid)."""
        if self._fd is not None:
            os.ftruncate(self._fd, size)
            self.whole = size

    def commit(self) -> None:
        """Flush to disk, then rename: readers see the old file or the whole new one, never a mix."""
        self.flush()
        assert self._fd is not None
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            replace_output(self.partial, self.path)
        except OSError as error:
            raise write_failed(self.path, error) from None
        with contextlib.suppress(OSError):
            sync_folder(self.path.parent)

    def abandon(self) -> None:
        """Keep the whole batches written in the partial file (finished rows are never lost) and let go of it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> AtomicCsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abandon()


def flush_together(writers: Sequence[AtomicCsvWriter]) -> None:
    """Flush one batch to several files, or to none: when one write fails, every file is cut back to the batch
    before, so the predictions and errors.csv partial files always end on the same batch."""
    marks = [writer.whole for writer in writers]
    try:
        for writer in writers:
            writer.flush()
    except OutputError:
        for writer, mark in zip(writers, marks, strict=True):
            writer.truncate(mark)
        raise


def write_atomic_text(path: Path, text: str) -> None:
    """A small file (run.json) written whole, through the same partial-then-rename step."""
    write_atomic_bytes(path, text.encode(ENCODING))


def write_atomic_bytes(path: Path, data: bytes) -> None:
    partial = partial_path(path)
    try:
        with os.fdopen(open_output(partial, FLAGS["w"]), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_output(partial, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            remove_output(partial)
        raise write_failed(path, error) from None


def read_output_text(path: Path) -> str:
    """A small output file (a resume record), read through the gate."""
    with os.fdopen(open_output(path, os.O_RDONLY), encoding=ENCODING) as f:
        return f.read()
