"""Which files loading a model reads from disk: a class may load weights of its own, import a helper module, or
read a tokenizer or shards beside its config. A resumed run compares their contents (harness/pipeline/resume.py),
so a model that changed on disk is never continued as if it were the same one."""

from __future__ import annotations

import contextlib
import glob
import os
import site
import sys
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


def software_places(import_path: bool = True) -> set[Path]:
    """Python, its packages and the harness: the installation's folders, the folders of what is already imported,
    editable installs' packages, and with `import_path` every other folder on it (but where the program was started
    from: that is the user's working folder, not software)."""
    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages()}
    if import_path:
        places.update(entry for entry in sys.path[1:] if entry)
    for entry in sys.path:  # installed packages' metadata, an editable install's beside its source included
        places.update(glob.glob(os.path.join(entry or ".", "*.dist-info")))
        places.update(glob.glob(os.path.join(entry or ".", "*.egg-info")))
    for name, module in list(sys.modules.items()):
        if name == "__main__":  # the program itself, which tracebacks and warnings quote
            places.add(getattr(module, "__file__", None) or "")
            continue
        found = getattr(module, "__path__", None)
        if isinstance(found, list | tuple) or type(found).__name__ == "_NamespacePath":
            places.update(str(entry) for entry in found)
        mapping = getattr(module, "MAPPING", None) if name.startswith("__editable__") else None
        if isinstance(mapping, dict):
            places.update(str(value) for value in mapping.values())
    return {Path(place).resolve() for place in places if place and os.path.isabs(place)}


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
        software = software_places(import_path=False)  # a folder on PYTHONPATH may hold a model's weights
        on_path = {Path(entry or ".").resolve() for entry in sys.path}
        for name in opened:
            path = Path(name).resolve()
            if path.parts[1:2] in (("proc",), ("sys",), ("dev",)) or not path.is_file():
                continue
            if not any(path.is_relative_to(folder) for folder in software) and not _metadata(path, on_path):
                found.add(str(path))


def _metadata(path: Path, on_path: set[Path]) -> bool:
    """A file of an installed package's metadata (a `.dist-info` or `.egg-info` folder in a folder on the import
    path), known by its place alone: a confined run cannot list those folders to find them (an editable install's
    lies beside its source)."""
    return any(
        folder.name.endswith((".dist-info", ".egg-info")) and folder.parent in on_path for folder in path.parents
    )
