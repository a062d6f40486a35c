"""A model folder handed in as a zip file: unpacked safely into a temporary folder that the run then uses.

A submission is untrusted input, so the zip is checked before anything is written: no absolute paths or `..`
entries (path traversal), no symbolic links (they could point out of the folder), at most MAX_ENTRIES entries
and MAX_BYTES unpacked, counted while writing (the sizes in a zip's directory can lie).
"""

from __future__ import annotations

import atexit
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from harness.errors import ModelError

MAX_BYTES = 4 * 1024**3
MAX_ENTRIES = 10_000
CHUNK = 1024 * 1024


def _checked_name(info: zipfile.ZipInfo, zip_path: Path) -> PurePosixPath:
    name = PurePosixPath(info.filename.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts or ":" in info.filename:
        raise ModelError(f"{zip_path} is refused: entry {info.filename!r} would be written outside the folder")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ModelError(f"{zip_path} is refused: entry {info.filename!r} is a symbolic link")
    return name


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
        written = 0
        for info, name in zip(entries, names, strict=True):
            target = destination.joinpath(*name.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "wb") as sink:
                while chunk := source.read(CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise ModelError(f"{zip_path} is refused: it unpacks to more than {max_bytes:,} bytes")
                    sink.write(chunk)
    tops = [p for p in destination.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else destination


def open_submission(values: dict[str, Any]) -> dict[str, Any]:
    """The settings with a zip `model_dir` replaced by its unpacked folder, removed when the process exits."""
    model_dir = values.get("model_dir")
    if not model_dir or not str(model_dir).lower().endswith(".zip"):
        return values
    folder = Path(tempfile.mkdtemp(prefix="harness-submission-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {**values, "model_dir": str(extract_submission(Path(model_dir), folder))}
