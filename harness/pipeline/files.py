"""Finding the images: every image file under the input folder, keyed and sorted, and each rank's share of them.

Keys are paths relative to the input folder with '/' separators, so a flat folder gives the basenames the
ObjectNet scorer matches, and two files of the same name in different subfolders stay two rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from harness.errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
T = TypeVar("T")


@dataclass(frozen=True)
class ImageFile:
    path: str
    key: str


def discover(root: Path) -> list[ImageFile]:
    """Every image under `root` (any letter case of the extensions), hidden files and folders skipped, sorted.

    Directory symlinks are followed once each, so a link loop cannot make the walk endless.
    """
    if not root.exists():
        raise InputError(f"input folder {root} does not exist: mount or pass a folder of images")
    if not root.is_dir():
        raise InputError(f"input {root} is not a folder: pass the folder that holds the images")
    found: list[ImageFile] = []
    seen_dirs: set[str] = set()
    base = os.fspath(root)

    def walk(folder: str, prefix: str) -> None:
        real = os.path.realpath(folder)
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            if folder == base:
                raise InputError(f"cannot read input folder {root}: {error.strerror}") from None
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            key = prefix + entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                walk(entry.path, key + "/")
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(ImageFile(entry.path, key))

    walk(base, "")
    found.sort(key=lambda image: image.key)
    return found


def run_files(root: Path) -> list[ImageFile]:
    """The images a run classifies: `discover`, and an error when there are none."""
    files = discover(root)
    if not files:
        raise InputError(
            f"no images in {root} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}, any letter case)"
        )
    return files


def shard(items: list[T], rank: int, world_size: int, unit: int = 1) -> list[T]:
    """Rank `rank`'s contiguous slice; the slices of all ranks partition `items` in order.

    Slices hold whole batches of `unit` items, so every batch is the one a single process would have run: a
    model's numbers can depend on what else is in its batch, and the merged CSV must match a single run's.
    """
    units = -(-len(items) // unit)
    return items[units * rank // world_size * unit : units * (rank + 1) // world_size * unit]
