"""What a run's answers depend on, named by content: every setting that can change a row (all but ROW_NEUTRAL's,
each with why) and the model's files by their contents. The resume record (harness/pipeline/resume.py) and the
export cache's key (harness/pipeline/export_cache.py) are both made of these, so the two cannot disagree about what
makes a model the same one. Torch-free and numpy-free: the export cache's key is made in the gate, a process that
forks before the run confines itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness.config import RUN_FIELDS, Config, path_settings
from harness.results.gate import normal
from harness.results.report import distributions


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's contents, or None for no file."""
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


FOLDER_FILES_MAX = 2000  # a model folder with more is someone's whole tree: only the files the load read count
FOLDER_BYTES_MAX = 16 * 2**30


Digest = Callable[[str | Path | None], str | None]


def digests_once() -> Digest:
    """file_digest for one record: a file it names twice (the checkpoint and model.py also lie in the model
    folder) is read once. Not kept across records, so an edit between two of them is always seen."""
    seen: dict[Path, str | None] = {}

    def digest(path: str | Path | None) -> str | None:
        if path is None:
            return None
        resolved = Path(path).resolve()
        if resolved not in seen:
            seen[resolved] = file_digest(resolved)
        return seen[resolved]

    return digest


def model_paths(
    folder: Path, files_read: Iterable[str | Path], outputs: frozenset[Path] = frozenset()
) -> dict[str, Path]:
    """Everything the model is made of, each file by the name the record gives it: each file in its folder (by path
    inside it, hidden files, bytecode caches and the run's own `outputs` aside) and each file loading it read from
    elsewhere (by absolute path)."""
    chosen: dict[str, Path] = {}
    if folder.is_dir():
        listed, size = [], 0
        for path in sorted(folder.rglob("*")):
            inside = path.relative_to(folder).parts
            if any(part.startswith(".") or part == "__pycache__" for part in inside) or not path.is_file():
                continue
            if normal(path) in outputs:
                continue
            listed.append(path)
            size += path.stat().st_size
            if len(listed) > FOLDER_FILES_MAX or size > FOLDER_BYTES_MAX:
                listed = []
                break
        chosen.update((path.relative_to(folder).as_posix(), path) for path in listed)
    resolved = folder.resolve()
    for name in files_read:
        path = Path(name)
        key = path.relative_to(resolved).as_posix() if path.is_relative_to(resolved) else str(name)
        chosen.setdefault(key, path)
    return dict(sorted(chosen.items()))


def setting_paths(config: Config, role: str) -> list[Path]:
    """Every file or folder a setting with this role names (harness/config.py: path_settings), as the run will
    look for it: as given, and inside the model folder; by real path, once. The confinement lets a run read these,
    and the export cache's key holds the files among them by content."""
    places = (place for value in path_settings(config, role) for place in (Path(value), config.model_dir / value))
    return sorted({place.resolve() for place in places if place.exists()})


def model_files(
    folder: Path,
    files_read: Iterable[str | Path],
    digest: Digest = file_digest,
    outputs: frozenset[Path] = frozenset(),
) -> dict[str, str | None]:
    """The contents of everything the model is made of (`model_paths`)."""
    return {key: digest(path) for key, path in model_paths(folder, files_read, outputs).items()}


# The settings that cannot change a finished row, each with why; every other setting is in the record as it was
# given (tests/test_resume.py walks them: a new setting is recorded unless it is declared here).
ROW_NEUTRAL = {
    "input_dir": "each row's image is recorded by its own size and time, wherever its folder is mounted",
    "output_file": "where the rows go, not what they hold",
    "model": "the model is recorded by its files' contents (model_files, model_source, checkpoint)",
    "model_dir": "the model is recorded by its files' contents, wherever they are unpacked",
    "module": "the model is recorded by its files' contents",
    "checkpoint": "recorded by its contents and the weights entry taken",
    "label_map": "recorded as the map's name, or a labels file's contents",
    "device": "recorded as the device the run resolved it to",
    "gpus": "recorded as the GPUs the run used",
    "batch_size": "recorded as the batch the model sees (batch_size_total)",
    "channels_last": "recorded as the layout the run chose",
    "threads": "recorded as the thread count torch ran with",
    "workers": "every decoding process gives the same pixels",
    "head_start": "the head start decodes as the workers do (tests/test_headstart.py)",
    "decoder_priority": "a process's priority moves no pixel",
    "keep_freed_memory": "the allocator's settings move no number",
    "export_cache": "a kept export is the same model's export, checked as a new one is (harness/pipeline/engine.py)",
    "omp_spin_count": "how long a thread waits moves no number",
    "max_failures": "it judges the finished run; the rows are written the same",
    "skip_unreadable_folders": "a folder that cannot be listed has no rows either way",
    "resume": "asks to continue, changes no row",
    "progress": "the progress bar",
    "confine": "a confined run writes the same bytes (tests/test_confine.py)",
    "trust_pickle": "lets a pickled model load; what it loads is recorded by its contents",
    "save_probs": "refused with --resume",
    "dist_timeout": "how long the ranks wait for each other",
    "master_addr": "where the ranks meet",
    "master_port": "where the ranks meet",
    "local_rank": "the GPU it picks is recorded as the device",
    "local_world_size": "shares the cores for decoding",
}


def recorded_settings(config: Config) -> dict[str, Any]:
    """Every setting that can change a row, as given: all but ROW_NEUTRAL's."""
    values = config.to_dict()
    settings = {name: values[name] for name in RUN_FIELDS if name not in ROW_NEUTRAL}
    settings.update(values["preprocess"])
    return settings


def installed_digest() -> str:
    """Every installed package and its version, as one digest: a model's code may import or load weights from any
    of them, so a change to any one is a change to what the model is."""
    return hashlib.sha256("\n".join(distributions()).encode()).hexdigest()
