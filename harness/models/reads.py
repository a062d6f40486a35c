"""Which files loading a model reads from disk: a class may load weights of its own, import a helper module, or
read a tokenizer or shards beside its config. A resumed run compares their contents (harness/pipeline/resume.py),
so a model that changed on disk is never continued as if it were the same one."""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_watching: list[set[str]] = []
_installed = False


def _on_event(event: str, args: tuple[object, ...]) -> None:
    """Python's audit hook: cheap when nothing is watched (it stays installed for the life of the process)."""
    if not _watching or event != "open":
        return
    path, mode, flags = args
    if not isinstance(path, str | bytes | os.PathLike):
        return
    if isinstance(mode, str) and any(letter in mode for letter in "wax+"):
        return
    if isinstance(flags, int) and flags & _WRITE_FLAGS:
        return
    _watching[-1].add(os.fsdecode(path))


def _software_folders() -> tuple[Path, ...]:
    """Python's own and installed packages' folders: their versions, not their files, describe them."""
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    folders = {sys.prefix, sys.base_prefix, sys.exec_prefix, *(sysconfig.get_paths().get(name, "") for name in names)}
    return tuple(Path(folder).resolve() for folder in folders if folder)


@contextlib.contextmanager
def watch_reads() -> Iterator[set[str]]:
    """The files opened for reading inside the block, as resolved paths of regular files outside Python's own
    folders and the system's (/proc, /sys, /dev); filled in when the block ends."""
    global _installed
    if not _installed:
        sys.addaudithook(_on_event)
        _installed = True
    opened: set[str] = set()
    _watching.append(opened)
    found: set[str] = set()
    try:
        yield found
    finally:
        _watching.pop()
        software = _software_folders()
        for name in opened:
            path = Path(name).resolve()
            if path.parts[1:2] in (("proc",), ("sys",), ("dev",)) or not path.is_file():
                continue
            if not any(path.is_relative_to(folder) for folder in software):
                found.add(str(path))
