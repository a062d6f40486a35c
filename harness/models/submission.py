"""A model folder handed in as a zip file: unpacked safely into a temporary folder that the run then uses.

A submission is untrusted input, so the zip is checked before anything is written: no absolute paths or `..`
entries (path traversal), no symbolic links (they could point out of the folder), at most MAX_ENTRIES entries,
at most MAX_BYTES declared in all, and no entry compressed more than MAX_RATIO to one (a zip bomb). The sizes in
a zip's directory can lie, so every entry is counted again while it is written and stopped at its declared size.
A damaged zip (a bad CRC, a file and a folder of the same name) is refused with the reason, never half-used.
"""

from __future__ import annotations

import atexit
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from harness.errors import ModelError

MAX_BYTES = 4 * 1024**3
MAX_ENTRIES = 10_000
MAX_RATIO = 200  # uncompressed : compressed; real weights compress by less than 2, text by about 10
RATIO_FROM_BYTES = 2**20  # small entries may compress as they like
CHUNK = 1024 * 1024
ENCRYPTED = 0x1  # the zip flag bit of an encrypted entry


def _checked_name(info: zipfile.ZipInfo, zip_path: Path) -> PurePosixPath:
    name = PurePosixPath(info.filename.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts or ":" in info.filename:
        raise ModelError(f"{zip_path} is refused: entry {info.filename!r} would be written outside the folder")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ModelError(f"{zip_path} is refused: entry {info.filename!r} is a symbolic link")
    return name


def _check_sizes(entries: list[zipfile.ZipInfo], zip_path: Path, max_bytes: int) -> None:
    declared = sum(info.file_size for info in entries)
    if declared > max_bytes:
        raise ModelError(f"{zip_path} is refused: it declares {declared:,} bytes unpacked, more than {max_bytes:,}")
    for info in entries:
        ratio = info.file_size / max(1, info.compress_size)
        if info.file_size > RATIO_FROM_BYTES and ratio > MAX_RATIO:
            raise ModelError(
                f"{zip_path} is refused: entry {info.filename!r} unpacks {ratio:.0f} times larger than it is stored "
                f"(more than {MAX_RATIO}), as a zip bomb does; if it is a real model file, unpack the zip yourself "
                "and pass the folder"
            )


def _unpack(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, zip_path: Path) -> None:
    with archive.open(info) as source, open(target, "wb") as sink:
        written = 0
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > info.file_size:
                raise ModelError(
                    f"{zip_path} is refused: entry {info.filename!r} unpacks to more than the {info.file_size:,} "
                    "bytes it declares"
                )
            sink.write(chunk)


def extract_submission(zip_path: Path, destination: Path, max_bytes: int = MAX_BYTES) -> Path:
    """Unpack into `destination`; returns the model folder (the zip's single top folder, if it has one)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ModelError(f"{zip_path} is not a readable zip file: {error}") from None
    with archive:
        entries = archive.infolist()
        if len(entries) > MAX_ENTRIES:
            raise ModelError(f"{zip_path} is refused: {len(entries)} entries, more than {MAX_ENTRIES}")
        names = [_checked_name(info, zip_path) for info in entries]  # every entry checked before any is written
        locked = next((info.filename for info in entries if info.flag_bits & ENCRYPTED), None)
        if locked is not None:
            raise ModelError(
                f"{zip_path} is refused: entry {locked!r} is encrypted (password-protected); zip it again without a "
                "password"
            )
        _check_sizes(entries, zip_path, max_bytes)
        for info, name in zip(entries, names, strict=True):
            target = destination.joinpath(*name.parts)
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _unpack(archive, info, target, zip_path)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
                raise ModelError(f"{zip_path} is damaged: entry {info.filename!r}: {error}") from error
            except OSError as error:  # a file and a folder of the same name, a full disk, ...
                raise ModelError(
                    f"{zip_path} cannot be unpacked: entry {info.filename!r}: {error.strerror or error}"
                ) from error
    tops = [p for p in destination.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else destination


def open_submission(values: dict[str, Any]) -> dict[str, Any]:
    """The settings with a zip `model` or `model_dir` replaced by its unpacked folder, removed when the process
    exits."""
    for name in ("model", "model_dir"):
        given = values.get(name)
        if given and str(given).lower().endswith(".zip"):
            folder = Path(tempfile.mkdtemp(prefix="harness-submission-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            return {**values, name: str(extract_submission(Path(given), folder))}
    return values
