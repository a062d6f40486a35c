"""Finding the images: every image file under the input folder, keyed and sorted, and each rank's share of them.

Keys are paths relative to the input folder with '/' separators, so a flat folder gives the basenames the
ObjectNet scorer matches, and two files of the same name in different subfolders stay two rows.

Every file is accounted for: one named as an image (IMAGE_EXTENSIONS, any letter case) is an image; any other,
whatever its name or none, is an image when Pillow takes it for one by its first bytes (each format's own test),
else it is skipped, and the run says how many and which (run.json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from harness.errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
T = TypeVar("T")


@dataclass(frozen=True)
class ImageFile:
    path: str
    key: str


@dataclass
class Discovery:
    """What a walk of the input folder found: the images, the folders it could not list (with why), where the
    links it followed lead (a confined run may read there too: harness/pipeline/confine.py), and the files that are
    not images (hidden ones included)."""

    files: list[ImageFile]
    unreadable: list[tuple[str, str]]  # (folder key ending in '/', reason)
    linked: list[Path] = field(default_factory=list)  # the real folders and images behind links
    skipped: list[str] = field(default_factory=list)  # keys of the files that are not images, sorted


SNIFF_BYTES = 16  # what Pillow's Image.open reads to tell a format


def pillow_identifies(path: str) -> bool:
    """Whether Pillow takes the file for an image of a format it opens, by its first bytes alone (each format's own
    test, Image.OPEN's accept functions: byte comparisons, no parsing), whatever the file's name says."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            prefix = f.read(SNIFF_BYTES)
    except OSError:
        return False
    Image.init()
    return any(accept is not None and accept(prefix) for _, accept in Image.OPEN.values())


def scan(root: Path) -> Discovery:
    """Every image under `root` (any letter case of the extensions), hidden files and folders skipped, sorted; and
    every folder below it that could not be listed.

    The walk keeps its own stack (no recursion limit, however deep the folders) and follows each directory
    symlink once, so a link loop cannot make it endless.
    """
    if not root.exists():
        raise InputError(f"input folder {root} does not exist: mount or pass a folder of images")
    if not root.is_dir():
        raise InputError(f"input {root} is not a folder: pass the folder that holds the images")
    walk = _Walk()
    stack = [(os.fspath(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = walk.listing(folder)
        except OSError as error:
            if not prefix:
                raise InputError(f"cannot read input folder {root}: {error.strerror}") from None
            walk.unreadable.append((prefix, f"folder cannot be listed: {error.strerror or error}"))
            continue
        stack += walk.sort_out(entries, prefix)
    return walk.discovery()


@dataclass
class _Walk:
    """What the walk has found so far, and the folders it has listed (by device and inode: each once)."""

    found: list[ImageFile] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    linked: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    listed: set[tuple[int, int]] = field(default_factory=set)

    def listing(self, folder: str) -> list[os.DirEntry[str]]:
        """The folder's entries; none where it was listed before (a link back up)."""
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in self.listed:
            return []
        self.listed.add((status.st_dev, status.st_ino))
        with os.scandir(folder) as entries:
            return list(entries)

    def sort_out(self, entries: list[os.DirEntry[str]], prefix: str) -> list[tuple[str, str]]:
        """Each entry an image, a file skipped, or a folder to walk (returned, with its keys' prefix)."""
        folders = []
        for entry in entries:
            key = prefix + entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if entry.name.startswith("."):  # hidden: never an image of the set, but still accounted for
                self.skipped += [] if is_dir else [key]
                continue
            image = not is_dir and _is_image(entry)
            if not is_dir and not image:
                self.skipped.append(key)
            if (is_dir or image) and entry.is_symlink():
                self.linked.append(Path(os.path.realpath(entry.path)))
            if is_dir:
                folders.append((entry.path, key + "/"))
            elif image:
                self.found.append(ImageFile(entry.path, key))
        return folders

    def discovery(self) -> Discovery:
        return Discovery(
            sorted(self.found, key=lambda image: image.key), sorted(self.unreadable), self.linked, sorted(self.skipped)
        )


def _is_image(entry: os.DirEntry[str]) -> bool:
    if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        regular = entry.is_file()
    except OSError:
        return False
    return regular and pillow_identifies(entry.path)


def _named(unreadable: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{key} ({reason.split(': ', 1)[-1]})" for key, reason in unreadable[:10])
    return shown + (f", and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")


def discover(root: Path) -> list[ImageFile]:
    """Every image under `root`; an error naming the folders that could not be listed, if any."""
    found = scan(root)
    if found.unreadable:
        raise InputError(f"{len(found.unreadable)} folder(s) under {root} cannot be listed: {_named(found.unreadable)}")
    return found.files


def run_files(root: Path, skip_unreadable: bool) -> Discovery:
    """The images a run classifies, chosen before any work: an error when there are none, or when a folder cannot
    be listed (its images would silently get no row) unless the run is told to skip such folders."""
    found = scan(root)
    if found.unreadable and not skip_unreadable:
        raise InputError(
            f"{len(found.unreadable)} folder(s) under {root} cannot be listed, so their images would get no row: "
            f"{_named(found.unreadable)}. Fix the permissions or the mount, or pass --skip-unreadable-folders "
            "(each is then a line in errors.csv and counts as a failure)"
        )
    if not found.files:
        raise InputError(
            f"no images in {root} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}, any letter case)"
        )
    return found


def shard(items: list[T], rank: int, world_size: int, unit: int = 1) -> list[T]:
    """Rank `rank`'s contiguous slice; the slices of all ranks partition `items` in order.

    Slices hold whole batches of `unit` items, so every batch is the one a single process would have run: a
    model's numbers can depend on what else is in its batch, and the merged CSV must match a single run's.
    """
    units = -(-len(items) // unit)
    return items[units * rank // world_size * unit : units * (rank + 1) // world_size * unit]
