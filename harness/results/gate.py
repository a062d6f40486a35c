"""The one way a run's output files are opened, renamed and removed: each named before the run starts, none
reached through a link, and in a confined run by a process outside the confinement.

A run knows its output files before it loads anything: the predictions, errors.csv, run.json, the resume record,
`--save-probs`, each with its `.partial` file, and under torchrun the ranks' parts (`OutputFiles`). Every open,
rename and removal of an output file goes through `open_output`, `replace_output`, `remove_output` and their kin,
which refuse any other name and never follow a link at the final name, confined or not.

A confined run (harness/pipeline/confine.py) may not write its output folder at all: the model runs in that
process, and the output folder may hold the user's other files. So before it confines itself the run forks the
gate, a small process that stays outside the confinement and does these few operations for it, on these names
only, handing back open descriptors; once the run's last descriptor to it closes, the gate removes the run's
private temporary folder and exits. A model can ask the gate for nothing but what the run itself writes.

The gate also keeps the run's one entry of the export cache (harness/pipeline/export_cache.py: a `Store`), which
it alone names: the run may ask for that entry's bytes, or hand it new bytes as a descriptor, and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PARTIAL = ".partial"
MESSAGE_BYTES = 65536
OPEN_FLAGS = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_EXCL | os.O_DIRECTORY  # a caller's part
FILE_MODE = 0o644


def partial_path(path: Path) -> Path:
    """Where a file is written until it is whole: renamed over `path` only then."""
    return path.with_name(path.name + PARTIAL)


def normal(path: Path | str) -> Path:
    """An output's name as the gate compares it: its folder's real path (links resolved, as they stand before the
    run starts) and its own name as given, so a link at the name itself is never followed."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


@dataclass(frozen=True)
class OutputFiles:
    """The files a run may write (each with its `.partial`), and the folders it may make and remove whole (the
    ranks' parts under torchrun). `anything` is the gate of a process that runs no model: any name."""

    files: frozenset[Path] = frozenset()
    folders: frozenset[Path] = frozenset()
    anything: bool = False

    @classmethod
    def of(cls, files: Iterable[Path], folders: Iterable[Path] = ()) -> OutputFiles:
        named = {normal(path) for file in files for path in (file, partial_path(file))}
        return cls(frozenset(named), frozenset(normal(folder) for folder in folders))

    def __or__(self, other: OutputFiles) -> OutputFiles:
        return OutputFiles(self.files | other.files, self.folders | other.folders, self.anything or other.anything)

    def file(self, path: Path) -> Path:
        named = normal(path)
        if not self.anything and named not in self.files:
            raise OSError(errno.EACCES, "not one of the run's output files", str(path))
        return named

    def folder(self, path: Path) -> Path:
        named = normal(path)
        parents = {file.parent for file in self.files}
        if not self.anything and named not in self.folders and named not in parents:
            raise OSError(errno.EACCES, "not one of the run's output folders", str(path))
        return named


ANYTHING = OutputFiles(anything=True)


class Store(Protocol):
    """One entry kept between runs, named by the gate's side alone (harness/pipeline/export_cache.py)."""

    def read(self) -> int | None:
        """A read-only descriptor of the entry, or None where there is none."""

    def write(self, fd: int) -> None:
        """The entry replaced by the contents of the regular file `fd`; OSError where it is refused."""


def _open(allowed: OutputFiles, path: Path, flags: int) -> int:
    """A descriptor of an output file, or of an output folder (O_DIRECTORY, read only): never through a link at
    its name, never a device or a pipe left under it (O_NONBLOCK while opening, so a pipe cannot block)."""
    if flags & ~OPEN_FLAGS:
        raise OSError(errno.EINVAL, "flags the gate does not take", str(path))
    if flags & os.O_DIRECTORY:
        named = allowed.folder(path)
        return os.open(named, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    named = allowed.file(path)
    fd = os.open(named, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    os.set_blocking(fd, True)
    return fd


def _replace(allowed: OutputFiles, source: Path, target: Path) -> None:
    named = allowed.file(source)
    if not stat.S_ISREG(os.lstat(named).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(source))
    os.replace(named, allowed.file(target))


def _remove(allowed: OutputFiles, path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(allowed.file(path))


def _make_folder(allowed: OutputFiles, path: Path) -> None:
    named = normal(path)
    if not allowed.anything and named not in allowed.folders:
        raise OSError(errno.EACCES, "not one of the run's output folders", str(path))
    os.makedirs(named, exist_ok=True)


def _remove_folder(allowed: OutputFiles, path: Path) -> None:
    named = normal(path)
    if not allowed.anything and named not in allowed.folders:
        raise OSError(errno.EACCES, "not one of the run's output folders", str(path))
    shutil.rmtree(named, ignore_errors=True)


def _sync_folder(allowed: OutputFiles, path: Path) -> None:
    fd = _open(allowed, path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _perform(
    allowed: OutputFiles, request: dict[str, Any], store: Store | None = None, fds: Sequence[int] = ()
) -> int | None:
    """One operation, checked against `allowed`: an open descriptor for `open` and `read_entry`, else None. Raises
    OSError."""
    op, path = request.get("op"), Path(str(request.get("path", "")))
    if op in ("read_entry", "write_entry"):
        if store is None:
            raise OSError(errno.ENOENT, "this run keeps no export cache")
        if op == "read_entry":
            return store.read()
        if len(fds) != 1:
            raise OSError(errno.EINVAL, "an entry comes as one descriptor")
        store.write(fds[0])
    elif op == "open":
        return _open(allowed, path, int(request.get("flags", 0)))
    elif op == "replace":
        _replace(allowed, path, Path(str(request.get("to", ""))))
    elif op == "remove":
        _remove(allowed, path)
    elif op == "make_folder":
        _make_folder(allowed, path)
    elif op == "remove_folder":
        _remove_folder(allowed, path)
    elif op == "sync_folder":
        _sync_folder(allowed, path)
    else:
        raise OSError(errno.EINVAL, f"no such operation {op!r}")
    return None


class _Local:
    """The operations in this process, checked the same way (an unconfined run, or a tool that runs no model)."""

    def __init__(self, allowed: OutputFiles, store: Store | None = None) -> None:
        self.allowed = allowed
        self.store = store

    def __call__(self, request: dict[str, Any], fds: Sequence[int] = ()) -> int | None:
        return _perform(self.allowed, request, self.store, fds)


class _Remote:
    """The operations done by the gate process, over a UNIX socket: a request and its numbered reply, so a reply
    that arrives after an interrupted wait (Ctrl-C) is never taken for the next one's."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.numbers = itertools.count()
        self.lock = threading.Lock()

    def __call__(self, request: dict[str, Any], fds: Sequence[int] = ()) -> int | None:
        with self.lock:
            number = next(self.numbers)
            try:
                socket.send_fds(self.channel, [json.dumps({**request, "id": number}).encode()], fds)
                while True:
                    data, fds, _, _ = socket.recv_fds(self.channel, MESSAGE_BYTES, 1)
                    if not data:
                        raise ConnectionError("it closed its end")
                    reply = json.loads(data)
                    if reply.get("id") == number:
                        break
                    for fd in fds:  # the reply to a request whose wait was interrupted
                        os.close(fd)
            except (ConnectionError, BrokenPipeError) as error:
                raise OSError(errno.EPIPE, f"the output gate has gone ({error})", str(request.get("path"))) from None
        if "errno" in reply:
            raise OSError(int(reply["errno"]), str(reply.get("strerror", "")), str(request.get("path")))
        return fds[0] if fds else None


_current: _Local | _Remote = _Local(ANYTHING)


def _ask(request: dict[str, Any], fds: Sequence[int] = ()) -> int | None:
    return _current(request, fds)


def open_output(path: Path, flags: int) -> int:
    """An output file's descriptor (os.open's flags: O_WRONLY | O_CREAT | O_TRUNC, O_RDONLY, ...)."""
    fd = _ask({"op": "open", "path": str(path), "flags": flags})
    assert fd is not None
    return fd


def replace_output(source: Path, target: Path) -> None:
    """Rename `source` over `target` (both output files): readers see the old file or the new, never a mix."""
    _ask({"op": "replace", "path": str(source), "to": str(target)})


def remove_output(path: Path) -> None:
    """Remove an output file; one that is not there is no error."""
    _ask({"op": "remove", "path": str(path)})


def make_folder(path: Path) -> None:
    _ask({"op": "make_folder", "path": str(path)})


def remove_folder(path: Path) -> None:
    """Remove an output folder and everything in it (torchrun's parts, once merged)."""
    _ask({"op": "remove_folder", "path": str(path)})


def sync_folder(path: Path) -> None:
    """fsync an output folder, so a rename in it survives a crash of the machine."""
    _ask({"op": "sync_folder", "path": str(path)})


def read_entry() -> int | None:
    """A read-only descriptor of the run's export cache entry, or None where it has none (OSError where the run
    keeps no cache)."""
    return _ask({"op": "read_entry"})


def write_entry(fd: int) -> None:
    """The run's export cache entry replaced by the contents of `fd` (a regular file, read from its start)."""
    _ask({"op": "write_entry"}, [fd])


@contextlib.contextmanager
def gated(allowed: OutputFiles, store: Store | None = None) -> Iterator[None]:
    """Output operations in this process, limited to `allowed` (and `store`), for the block (an unconfined run)."""
    global _current
    previous, _current = _current, _Local(allowed, store)
    try:
        yield
    finally:
        _current = previous


def start_gate(allowed: OutputFiles, remove_at_exit: list[Path], store: Store | None = None) -> None:
    """Fork the gate process (before the confinement: it stays outside it) and send every output operation of this
    process, and of the processes it starts, there from now on; `store` is the export cache entry it keeps. The gate
    removes `remove_at_exit` when the last of them has gone. Must run before any other thread exists (it forks)."""
    global _current
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the gate: it outlives a Ctrl-C (the run still writes run.json after one)
        ours.close()
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _serve(allowed, theirs, remove_at_exit, store)
        finally:
            os._exit(0)
    theirs.close()
    _current = _Remote(ours)


def _serve(
    allowed: OutputFiles, channel: socket.socket, remove_at_exit: list[Path], store: Store | None = None
) -> None:
    """The gate's life: answer requests until every descriptor of the run's end is closed, then clean up. It takes
    no request it cannot parse, and closes every descriptor a request brought."""
    while True:
        try:
            data, received, _, _ = socket.recv_fds(channel, MESSAGE_BYTES, 1)
        except OSError:
            break
        if not data:
            break
        fd, reply = None, {"id": None}
        try:
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("not a request")
            reply["id"] = request.get("id")
            fd = _perform(allowed, request, store, received)
        except OSError as error:
            reply.update(errno=error.errno or errno.EIO, strerror=error.strerror or str(error))
        except Exception:  # anything else a malformed request raises: the gate answers and lives on
            reply.update(errno=errno.EINVAL, strerror="not a request the gate takes")
        finally:
            for brought in received:
                os.close(brought)
        try:
            socket.send_fds(channel, [json.dumps(reply).encode()], [] if fd is None else [fd])
        except OSError:
            break
        finally:
            if fd is not None:
                os.close(fd)
    for folder in remove_at_exit:
        shutil.rmtree(folder, ignore_errors=True)
