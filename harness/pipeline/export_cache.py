"""The export cache (`--export-cache`): the ONNX export of a PyTorch model kept between runs, so a run of a model
exported before skips torch.export's proof and the export (seconds: docs/speed.md) and only checks it.

A submission's code runs in the run's process, so nothing that process does may choose which model an entry is
filed under: a model could otherwise file an export of its own under another model's name, and the next run of
that model would load it. So the cache is read and written by the gate (harness/results/gate.py), the process that
forks before the run confines itself and before any model code runs, and the gate alone names the entry: the
sha256 of what an export depends on (`ExportCache.parts`), made from its own copy of the settings:
- every setting that can change a row and the model's files by content: its folder and every file its settings name
  (harness/pipeline/identity.py, as the resume record has them);
- the harness's own code by content, Python, the machine and every installed package with its version.
The run may ask for that entry's bytes or hand over new ones, nothing else; so a model can fill only its own entry,
and what it fills passes the same check as an export made now (harness/pipeline/engine.py), the engine's verdict
an entry carries included (it moves only which engine runs, after that check). A model whose loading
read a file the key does not hold (weights elsewhere) is never cached: the key would not see that file change.

Bounds: an entry at most ENTRY_BYTES (ONNX's own protobuf limit), the cache at most CACHE_BYTES, the entries least
recently used removed first. Torch-free and numpy-free, as the gate is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness.config import Config
from harness.pipeline.identity import (
    digests_once,
    installed_digest,
    model_files,
    model_paths,
    recorded_settings,
    setting_paths,
)
from harness.results import gate

FORMAT = 2  # what an entry holds and how the key is made: a change makes every older entry another key
SUFFIX = ".onnx"
ENTRY = re.compile(rf"[0-9a-f]{{64}}{re.escape(SUFFIX)}")  # a key and SUFFIX: what prune may remove
PARTIAL = re.compile(rf"\.{ENTRY.pattern}\..+\.partial")  # an entry being written (mkstemp's name, in write)
ENTRY_BYTES = 2**31 - 1  # an ONNX file holds at most a 2 GB protobuf
CACHE_BYTES = 4 * 2**30
ENTRY_MODE = 0o644
STALE_PARTIAL_S = 24 * 3600  # a partial file this old is a crashed gate's
EXPORT_NEUTRAL = {"engine": "an export is the same whichever engine asked for it"}
FOLDER_NAME = ("objectnet-harness", "exports")


def cache_folder(config: Config, environ: Mapping[str, str]) -> Path | None:
    """Where `config.export_cache` keeps exports: `auto` is the user's cache folder (XDG_CACHE_HOME, else
    ~/.cache); `none` keeps none."""
    if config.export_cache == "none":
        return None
    if config.export_cache != "auto":
        return Path(os.path.abspath(config.export_cache))
    base = environ.get("XDG_CACHE_HOME", "").strip()
    if not os.path.isabs(base):
        home = environ.get("HOME", "").strip()
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base, *FOLDER_NAME)


def named_files(config: Config) -> list[Path]:
    """The files among what the settings name for the run to read: the model's besides its folder (the images are
    a folder, never one of them)."""
    return [path for path in setting_paths(config, "read") if path.is_file()]


def held_by_key(config: Config, outputs: frozenset[Path] = frozenset()) -> set[Path]:
    """The files a key holds by content, each by its real path."""
    return {path.resolve() for path in model_paths(config.model_dir, named_files(config), outputs).values()}


def not_held(config: Config, files_read: Iterable[str], outputs: frozenset[Path] = frozenset()) -> str | None:
    """Why an export of a model whose loading read `files_read` may not be cached (a file the key does not hold, so
    an edit of it would not be seen), or None."""
    held = held_by_key(config, outputs)
    outside = sorted(name for name in files_read if Path(name).resolve() not in held)
    if outside:
        more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
        return f"loading the model read {outside[0]}{more}, outside its folder and the files its settings name"
    return None


def code_digest() -> str:
    """The harness's own code, by content: an installed harness keeps its version number across edits."""
    digest = hashlib.sha256()
    package = Path(harness.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass
class ExportCache:
    """The gate's side (a `gate.Store`): the one entry this run may read and write, named from the settings as they
    stood before any model code ran. The key is made on first use (hashing the model's files), in the gate."""

    folder: Path
    config: Config
    outputs: frozenset[Path] = frozenset()
    _key: str | None = field(default=None, init=False)

    def parts(self) -> dict[str, Any]:
        settings = {name: value for name, value in recorded_settings(self.config).items() if name not in EXPORT_NEUTRAL}
        files = model_files(self.config.model_dir, named_files(self.config), digests_once(), self.outputs)
        return {
            "format": FORMAT,
            "harness": code_digest(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "installed": installed_digest(),
            "settings": settings,
            "model_files": files,
        }

    def key(self) -> str:
        if self._key is None:
            text = json.dumps(self.parts(), sort_keys=True)
            self._key = hashlib.sha256(text.encode()).hexdigest()
        return self._key

    def entry(self) -> Path:
        return self.folder / f"{self.key()}{SUFFIX}"

    def read(self) -> int | None:
        try:
            fd = os.open(self.entry(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > ENTRY_BYTES:
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(fd)  # used now: the last to be removed
        return fd

    def write(self, fd: int) -> None:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= ENTRY_BYTES:
            raise OSError(errno.EINVAL, f"an entry is a regular file of 1 to {ENTRY_BYTES} bytes")
        entry = self.entry()
        entry.parent.mkdir(parents=True, exist_ok=True)
        out, partial = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent)
        try:
            os.fchmod(out, ENTRY_MODE)
            copied = 0
            while copied < info.st_size:  # the size as it stood when checked, whatever the sender does after
                sent = os.sendfile(out, fd, copied, info.st_size - copied)
                if not sent:
                    raise OSError(errno.EIO, "the entry ended early")
                copied += sent
            os.fsync(out)
        except BaseException:
            os.unlink(partial)
            raise
        finally:
            os.close(out)
        os.replace(partial, entry)
        self.prune()

    def prune(self) -> None:
        """The cache within CACHE_BYTES: the entries least recently used removed first, never this run's; partial
        files a crashed gate left removed. Only files named as entries and their partial files are touched: the
        folder is the user's to choose, and may hold their own ONNX files."""
        entries = []
        for path in self.folder.iterdir():
            with contextlib.suppress(OSError):
                info = path.lstat()
                if PARTIAL.fullmatch(path.name) and time.time() - info.st_mtime > STALE_PARTIAL_S:
                    path.unlink()
                elif ENTRY.fullmatch(path.name) and stat.S_ISREG(info.st_mode):
                    entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= CACHE_BYTES:
                break
            if path != self.entry():
                with contextlib.suppress(OSError):
                    path.unlink()
                    total -= size


def export_cache(config: Config, environ: Mapping[str, str], outputs: frozenset[Path]) -> ExportCache | None:
    """The gate's store for a run (None where `--export-cache none` or no cache folder is known)."""
    folder = cache_folder(config, environ)
    return None if folder is None else ExportCache(folder, config, outputs)


def load() -> bytes | None:
    """The run's entry, through the gate: its bytes, or None where there is none or the run keeps no cache."""
    try:
        fd = gate.read_entry()
    except OSError:
        return None
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as entry:
        return entry.read()


def keep(data: bytes) -> str:
    """The run's entry replaced by `data`, through the gate: "written", or why not."""
    fd = os.memfd_create("harness-export")
    try:
        view, written = memoryview(data), 0
        while written < len(data):
            written += os.write(fd, view[written:])
        gate.write_entry(fd)
    except OSError as error:
        return f"not kept: {error.strerror or error}"
    finally:
        os.close(fd)
    return "written"
