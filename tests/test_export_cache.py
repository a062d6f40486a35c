"""The export cache: an entry is named by the gate alone, from everything an export depends on (the model's files
by content, every setting that can change a row, the harness's code, the packages); the run can read or replace
that one entry and nothing else, even when its model's code tries; entries and the cache are bounded; a later run
of the same model takes the kept export, checks it, and writes the same CSV."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import harness.pipeline.export_cache as export_cache
from harness.models import reads
from harness.pipeline import sandbox
from harness.pipeline.export_cache import EXPORT_NEUTRAL, ExportCache, cache_folder, keep, load, not_held
from harness.pipeline.identity import recorded_settings
from harness.results import gate
from harness.results.gate import OutputFiles, gated
from harness.sources import build_config
from tests.helpers import REPO, SAMPLES, env_without_build_args


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text("WEIGHTS = 1\n")
    (folder / "helper.py").write_text("GAIN = 2\n")
    return folder


def _config(folder: Path, **settings: str):
    return build_config({"model_dir": str(folder), **settings}, {}, {})


def _key(config, outputs: frozenset[Path] = frozenset()) -> str:
    return ExportCache(Path("/nowhere"), config, outputs).key()  # a fresh one: the key is made once an object


def test_the_key_holds_the_models_files_the_settings_the_code_and_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _model_folder(tmp_path)
    checkpoint = tmp_path / "elsewhere.pth"
    checkpoint.write_bytes(b"weights")
    config = _config(folder, checkpoint=str(checkpoint))
    first = _key(config)
    assert _key(config) == first and len(first) == 64
    parts = ExportCache(Path("/nowhere"), config).parts()
    assert set(parts) == {"format", "harness", "python", "machine", "installed", "settings", "model_files"}
    assert parts["settings"] == {k: v for k, v in recorded_settings(config).items() if k not in EXPORT_NEUTRAL}
    assert set(parts["model_files"]) == {"model.py", "helper.py", str(checkpoint)}

    (folder / "helper.py").write_text("GAIN = 3\n")  # a file of its folder the settings never name
    assert _key(config) != first
    second = _key(config)
    checkpoint.write_bytes(b"other weights")  # a file a setting names, outside the folder
    assert _key(config) != second
    third = _key(config)
    assert _key(_config(folder, checkpoint=str(checkpoint), input_size="192")) != third  # a row's setting
    for same in ({"engine": "onnxruntime"}, {"workers": "1"}, {"export_cache": "none"}, {"batch_size": "7"}):
        assert _key(_config(folder, checkpoint=str(checkpoint), **same)) == third, same
    (folder / "predictions.csv").write_text("a run's own output in the folder\n")
    assert _key(config, OutputFiles.of([folder / "predictions.csv"]).files) == third
    monkeypatch.setattr(export_cache, "installed_digest", lambda: "another package's version")
    assert _key(config) != third
    monkeypatch.setattr(export_cache, "code_digest", lambda: "another harness")
    assert _key(config) != third


def test_the_harness_code_is_held_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "harness"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "fold.py").write_text("A = 1\n")
    monkeypatch.setattr(export_cache.harness, "__file__", str(package / "__init__.py"))
    first = export_cache.code_digest()
    (package / "models" / "fold.py").write_text("A = 2\n")
    assert export_cache.code_digest() != first


def test_an_export_of_a_model_that_read_a_file_the_key_does_not_hold_is_not_kept(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    outside = tmp_path / "weights.bin"
    outside.write_bytes(b"w")
    config = _config(folder)
    assert not_held(config, [str(folder / "model.py"), str(folder / "helper.py")]) is None
    assert not_held(config, [str(folder / "model.py"), str(outside)]) == (
        f"loading the model read {outside}, outside its folder and the files its settings name"
    )
    assert "and 1 more" in not_held(config, [str(outside), str(tmp_path / "two.bin")])
    assert not_held(_config(folder, checkpoint=str(outside)), [str(outside)]) is None
    own = folder / "predictions.csv"  # the run's own output in the model folder: never in the key
    own.write_text("a.png,1\n")
    assert not_held(config, [str(own)], OutputFiles.of([own]).files) == (
        f"loading the model read {own}, outside its folder and the files its settings name"
    )


def test_the_cache_folder_is_the_users_a_given_one_or_none(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert cache_folder(config, {"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/objectnet-harness/exports")
    assert cache_folder(config, {"XDG_CACHE_HOME": "relative", "HOME": "/h"}) == Path(
        "/h/.cache/objectnet-harness/exports"
    )
    assert cache_folder(config, {}) is None
    assert cache_folder(_config(tmp_path, export_cache="NONE"), {"HOME": "/h"}) is None
    given = _config(tmp_path, export_cache="kept")
    assert cache_folder(given, {"HOME": "/h"}) == Path.cwd() / "kept"


def test_a_run_keeps_its_exports_where_its_settings_say_and_knows_its_own_outputs(tmp_path: Path) -> None:
    config, outputs = _config(tmp_path), OutputFiles.of([tmp_path / "p.csv"]).files
    store = export_cache.export_cache(config, {"XDG_CACHE_HOME": "/c"}, outputs)
    assert store is not None
    assert (store.folder, store.config, store.outputs) == (Path("/c/objectnet-harness/exports"), config, outputs)
    assert export_cache.export_cache(config, {}, outputs) is None
    assert export_cache.export_cache(_config(tmp_path, export_cache="none"), {"HOME": "/h"}, outputs) is None


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("entry")
    with open(fd, "wb", closefd=False) as file:
        file.write(data)
    return fd


def test_the_store_keeps_one_entry_bounded_never_through_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ExportCache(tmp_path / "cache", _config(_model_folder(tmp_path)))
    assert store.read() is None and not store.folder.exists()
    fd = _memfd(b"onnx bytes")
    store.write(fd)
    os.close(fd)
    assert store.entry().read_bytes() == b"onnx bytes" and [p.name for p in store.folder.iterdir()] == [
        store.entry().name
    ]
    with os.fdopen(store.read(), "rb") as entry:
        assert entry.read() == b"onnx bytes"
    read, write = os.pipe()
    with pytest.raises(OSError, match="a regular file of 1 to") as refused:
        store.write(read)  # a pipe could hold the gate forever, and has no size to check
    assert refused.value.errno == errno.EINVAL
    os.close(read), os.close(write)
    for data in (b"", b"x" * 11):
        monkeypatch.setattr(export_cache, "ENTRY_BYTES", 10)
        fd = _memfd(data)
        with pytest.raises(OSError, match="a regular file of 1 to 10 bytes"):
            store.write(fd)
        os.close(fd)
    assert store.entry().read_bytes() == b"onnx bytes"
    store.entry().unlink()
    store.entry().symlink_to(tmp_path / "model" / "model.py")
    with pytest.raises(OSError) as link:
        store.read()
    assert link.value.errno == errno.ELOOP
    store.entry().unlink()
    os.mkfifo(store.entry())  # opened without waiting for a writer, and refused
    assert store.read() is None
    store.entry().unlink()


def test_entries_at_their_bounds_are_kept_whole_with_the_gates_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ExportCache(tmp_path / "deep" / "er" / "cache", _config(_model_folder(tmp_path)))
    previous = os.umask(0o022)
    try:
        for data in (b"1", b"x" * 10):
            monkeypatch.setattr(export_cache, "ENTRY_BYTES", 10)
            fd = _memfd(data)
            store.write(fd)
            os.close(fd)
            assert store.entry().read_bytes() == data and os.stat(store.entry()).st_mode & 0o777 == 0o644
            with os.fdopen(store.read(), "rb") as entry:
                assert entry.read() == data
    finally:
        os.umask(previous)
    monkeypatch.setattr(export_cache.os, "utime", _refuse)  # another user's entry: read, not marked as used
    with os.fdopen(store.read(), "rb") as entry:
        assert entry.read() == b"x" * 10


def _refuse(*args: object, **kwargs: object) -> None:
    raise PermissionError(errno.EPERM, "Operation not permitted")


def test_an_entry_is_copied_whole_in_any_number_of_pieces_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ExportCache(tmp_path / "cache", _config(_model_folder(tmp_path)))
    sendfile, write = os.sendfile, os.write
    monkeypatch.setattr(export_cache.os, "sendfile", lambda out, fd, at, count: sendfile(out, fd, at, min(count, 7)))
    monkeypatch.setattr(export_cache.os, "write", lambda fd, data: write(fd, data[:7]))
    with gated(OutputFiles(), store):
        assert keep(bytes(range(50))) == "written"
    assert store.entry().read_bytes() == bytes(range(50))
    fstat = os.fstat

    def longer(fd: int) -> os.stat_result:  # the sender's file shrank after its size was checked
        info = list(fstat(fd))
        info[stat.ST_SIZE] += 5
        return os.stat_result(info)

    monkeypatch.setattr(export_cache.os, "fstat", longer)
    fd = _memfd(b"shorter")
    with pytest.raises(OSError) as early:
        store.write(fd)
    os.close(fd)
    assert (early.value.errno, early.value.strerror) == (errno.EIO, "the entry ended early")
    assert store.entry().read_bytes() == bytes(range(50)) and len(list(store.folder.iterdir())) == 1

    def shorter(fd: int) -> os.stat_result:  # the sender's file grew after its size was checked
        info = list(fstat(fd))
        info[stat.ST_SIZE] -= 5
        return os.stat_result(info)

    monkeypatch.setattr(export_cache.os, "fstat", shorter)
    fd = _memfd(bytes(range(50)))
    store.write(fd)
    os.close(fd)
    assert store.entry().read_bytes() == bytes(range(45))


def test_an_entry_is_written_beside_it_under_a_name_prune_knows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a gate killed while it copies leaves: a hidden partial file in the cache folder, which a later prune
    removes once it is a day old (a rename that fails stands for the kill)."""
    store = ExportCache(tmp_path / "cache", _config(_model_folder(tmp_path)))
    monkeypatch.setattr(export_cache.os, "replace", _refuse)
    fd = _memfd(b"entry")
    with pytest.raises(PermissionError):
        store.write(fd)
    os.close(fd)
    (left,) = store.folder.iterdir()
    assert left.name.startswith(f".{store.entry().name}.") and left.name.endswith(".partial")
    assert left.read_bytes() == b"entry"
    store.prune()
    assert left.exists()  # another gate may be copying it now
    os.utime(left, (time.time() - 2 * 86400,) * 2)
    store.prune()
    assert list(store.folder.iterdir()) == []


def test_the_cache_stays_within_its_bound_removing_the_least_recently_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries by age of last use, never this run's; only files named as entries or their partial files: the folder
    is the user's to choose, and their own ONNX files in it are never counted nor removed."""
    store = ExportCache(tmp_path / "cache", _config(_model_folder(tmp_path)))
    store.folder.mkdir()
    now = time.time()
    new, middle, old, oldest = (f"{letter * 64}.onnx" for letter in "abcd")
    for age, name in enumerate((new, middle, old, oldest)):
        (store.folder / name).write_bytes(b"x" * 10)
        os.utime(store.folder / name, (now - 100 * age, now - 100 * age))
    crashed, writing = f".{'e' * 64}.onnx.k3j_x1.partial", f".{'f' * 64}.onnx.9zq0ab.partial"
    users = ["mine.onnx", "notes.txt", ".mine.partial", f"{'a' * 63}.onnx", f"{'A' * 64}.onnx"]
    for name in (crashed, writing, *users):
        (store.folder / name).write_bytes(b"x" * 100)
        if name != writing:
            os.utime(store.folder / name, (now - 2 * 86400, now - 2 * 86400))
    monkeypatch.setattr(export_cache, "CACHE_BYTES", 35)
    fd = _memfd(b"y" * 10)
    store.write(fd)
    os.close(fd)
    assert sorted(path.name for path in store.folder.iterdir()) == sorted(
        [writing, middle, new, store.entry().name, *users]
    )
    monkeypatch.setattr(export_cache, "CACHE_BYTES", 30)  # exactly at the bound: nothing to remove
    store.prune()
    entries = sorted([middle, new, store.entry().name])
    assert sorted(path.name for path in store.folder.glob("????*.onnx") if path.name not in users) == entries
    lstat, unlink = Path.lstat, Path.unlink
    monkeypatch.setattr(Path, "lstat", lambda path: _refuse() if path.name == new else lstat(path))
    monkeypatch.setattr(Path, "unlink", lambda path: _refuse() if path.name == middle else unlink(path))
    monkeypatch.setattr(export_cache, "CACHE_BYTES", 5)  # another run's files may go or stay meanwhile
    store.prune()
    assert sorted(path.name for path in store.folder.glob("*.onnx") if path.name not in users) == entries
    monkeypatch.undo()
    monkeypatch.setattr(export_cache, "CACHE_BYTES", 5)  # this run's own entry stays, whatever the bound
    store.prune()
    assert sorted(path.name for path in store.folder.iterdir()) == sorted([writing, store.entry().name, *users])


def test_the_gate_reads_and_replaces_its_own_entry_only_whatever_a_request_names(tmp_path: Path) -> None:
    """The run's side asks, the gate's loop (a thread here, a process in a run) answers: the entry's name is the
    store's, never the request's; a descriptor a request brings is closed; a gate without a store refuses."""
    store = ExportCache(tmp_path / "cache", _config(_model_folder(tmp_path)))
    descriptors = set(os.listdir("/proc/self/fd"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = threading.Thread(target=gate._serve, args=(OutputFiles(), theirs, [], store))
    server.start()
    remote = gate._Remote(ours)
    assert remote({"op": "read_entry"}) is None
    fd = _memfd(b"first")
    remote({"op": "write_entry", "path": str(tmp_path / "victim.onnx"), "key": "victim"}, [fd])
    os.close(fd)
    assert store.entry().read_bytes() == b"first" and not (tmp_path / "victim.onnx").exists()
    with pytest.raises(OSError) as refused:
        remote({"op": "write_entry"})
    assert (refused.value.errno, refused.value.strerror) == (errno.EINVAL, "an entry comes as one descriptor")
    fd = remote({"op": "read_entry", "path": str(tmp_path / "model" / "model.py")})
    assert os.read(fd, 100) == b"first"
    os.close(fd)
    ours.close()
    server.join(10)
    theirs.close()
    assert set(os.listdir("/proc/self/fd")) <= descriptors
    with gated(OutputFiles()):
        with pytest.raises(FileNotFoundError, match="this run keeps no export cache"):
            gate.read_entry()
        assert load() is None
        assert keep(b"data") == "not kept: this run keeps no export cache"
    with gated(OutputFiles(), store):
        assert keep(b"second") == "written" and load() == b"second"


def test_the_gate_process_keeps_the_runs_entry(tmp_path: Path) -> None:
    store = ExportCache(tmp_path / "cache", _config(_model_folder(tmp_path)))
    previous = gate._current
    gate.start_gate(OutputFiles(), [], store)
    try:
        assert load() is None and keep(b"kept by the gate") == "written" and load() == b"kept by the gate"
        gate._current.channel.close()
    finally:
        gate._current = previous
    assert store.entry().read_bytes() == b"kept by the gate"


HOSTILE = """import os

import torch

from harness.pipeline import export_cache
from harness.results import gate

VICTIM = {victim!r}

# The run's own process choosing the entry: the gate names it from its own copy of the settings.
export_cache.ExportCache.key = lambda self: "victim"
junk = os.memfd_create("junk")
os.write(junk, b"not an export")
gate.write_entry(junk)  # its own entry, which the run then finds fails its check
try:
    with open(VICTIM, "wb") as other:  # another model's entry, directly
        other.write(b"overwritten")
except OSError:
    pass


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))
"""


def _run(model: Path, output: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "entrypoint.py", str(SAMPLES), str(output), "--model", str(model), "--workers", "0"]
    options = ["--progress", "false", "--engine", "onnxruntime", "--export-cache", str(cache), "--input-size", "32"]
    return subprocess.run(
        [*command, *options], cwd=REPO, env=env_without_build_args(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # a whole confined run; the gate's half is pinned in-process above
@pytest.mark.skipif(sandbox.landlock_abi() < 6, reason="needs a kernel with Landlock ABI 6 or newer")
def test_a_models_code_cannot_choose_its_entry_nor_reach_another(tmp_path: Path) -> None:
    """A confined run whose model patches the run's key, fills its own entry with junk and writes another model's
    entry directly: the other entry is untouched, the junk fails its check and is replaced by a real export."""
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = cache / ("0" * 64 + ".onnx")
    victim.write_bytes(b"another model's export")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.py").write_text(HOSTILE.format(victim=str(victim)))
    done = _run(model, tmp_path / "out" / "predictions.csv", cache)
    assert done.returncode == 0, done.stderr
    assert "harness: confined (" in done.stderr, done.stderr
    assert victim.read_bytes() == b"another model's export" and not (cache / "victim.onnx").exists()
    engine = json.loads((tmp_path / "out" / "run.json").read_text())["engine"]
    assert engine["cache"].startswith("written (the kept export failed its check: onnxruntime failed on the export")
    (entry,) = set(cache.glob("*.onnx")) - {victim}
    assert entry.stat().st_size > 1000


def test_package_metadata_read_while_loading_is_software_where_the_import_path_cannot_be_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confined run cannot list the folders on the import path (Landlock), so an editable install's metadata
    read while loading (torchvision's entry points) was taken for a file of the model's, and no export was kept."""
    site = tmp_path / "site"
    metadata = site / "pkg-1.0.dist-info"
    metadata.mkdir(parents=True)
    (metadata / "entry_points.txt").write_text("[x]\n")
    (site / "weights.bin").write_bytes(b"w")  # a folder on the import path may hold a model's weights
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    monkeypatch.setattr(reads.glob, "glob", lambda pattern: [])
    with reads.watch_reads() as found:
        for name in ("pkg-1.0.dist-info/entry_points.txt", "weights.bin"):
            (site / name).read_bytes()
    assert found == {str((site / "weights.bin").resolve())}
