"""The parallel input pipeline: decode, strip the frame, resize and crop in worker processes, in input order.

An image that cannot be decoded does not stop the run: its slot carries a blank tensor and the reason, and the
run writes a failure row for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from harness.config import TRANSFORM_FILE
from harness.errors import ModelError, describe_user_error
from harness.models.python_class import load_custom_transform
from harness.pipeline.confine import denial
from harness.pipeline.decode import DecodeTimeout, ModelFault, decode_sample
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import seeded_images
from harness.pipeline.files import ImageFile
from harness.pipeline.host import yield_cores
from harness.pipeline.tracker import DecoderTracker
from harness.pipeline.transforms import geometry

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class Batch:
    indices: list[int]
    images: torch.Tensor
    errors: list[str]  # "" where the image decoded
    seen: list[str]  # each file as it was read (decode.seen)

    def pin_memory(self) -> Batch:
        """Called by DataLoader's pinning thread, so the host-to-device copy can run without blocking."""
        self.images = self.images.pin_memory()
        return self


class ImageDataset(Dataset):
    """The run's files as the model's input, decoded as `decoding` says; `custom` is the model folder's own
    transform, loaded from `decoding.transform_file` (harness/models/python_class.py: load_custom_transform)."""

    def __init__(self, files: list[ImageFile], decoding: Decoding, custom: Transform | None = None) -> None:
        if (custom is None) != (decoding.transform_file is None):
            raise ValueError("a model folder's transform is run exactly where the decoding names its file")
        self.files = files
        self.decoding = decoding
        self.custom = custom
        side = decoding.pre.resize_to
        self.blank: torch.Tensor | None = None
        try:
            self.blank = torch.zeros_like(self._transform(Image.new("RGB", (side, side))))
        except Exception as error:  # only a model folder's own transform can fail here
            raise ModelError(f"the model folder's {TRANSFORM_FILE} failed on a blank image: {error}") from error
        self.tracker: DecoderTracker | None = None

    @classmethod
    def of(cls, files: list[ImageFile], decoding: Decoding) -> ImageDataset:
        """The dataset a run decodes with, the model folder's own transform loaded where the decoding names one."""
        return cls(files, decoding, load_custom_transform(decoding.transform_file))

    def watch(self, workers: int) -> DecoderTracker:
        """Have each worker record the index it is decoding, before the workers fork: when one dies or hangs,
        its slot still names the file that did it."""
        self.tracker = DecoderTracker(workers)
        return self.tracker

    def _transform(self, image: Image.Image) -> torch.Tensor:
        if self.custom is None:
            return torch.from_numpy(geometry(image, self.decoding.pre))
        try:
            out = self.custom(image)
        except DecodeTimeout:  # the image's time ran out while the transform worked on it: the image's failure
            raise
        except Exception as error:  # the model's code: its error stops the run (exit 4), named in one line
            raise ModelFault(
                denial(error) or f"{TRANSFORM_FILE}'s transform failed: {describe_user_error(error)}"
            ) from error
        if (
            not isinstance(out, torch.Tensor)
            or out.dim() != 3
            or not (out.is_floating_point() or out.dtype == torch.uint8)
        ):
            shown = f"{out.dtype} of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{TRANSFORM_FILE}'s transform returned {shown}, not a 3 x H x W tensor (end it with ToTensor())"
            )
        if self.blank is not None and out.shape != self.blank.shape:
            raise ValueError(
                f"{TRANSFORM_FILE}'s transform gave {tuple(out.shape)} for this image, {tuple(self.blank.shape)} for a "
                "blank one: every image must come out the same size (end it with a crop to a fixed size)"
            )
        return out

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str, str]:
        worker = get_worker_info()
        slot = worker.id if worker is not None else 0
        if self.tracker is not None:
            self.tracker.hold(slot, index)
        path = self.files[index].path
        image, error, seen = decode_sample(path, self.decoding, self._transform)
        if self.tracker is not None:
            self.tracker.release(slot)
        return index, (self.blank if image is None else image), error, seen


CHECK_IMAGES = 4  # of the run's own images, on which every speed-up must leave the scores as they were


def check_sample(dataset: ImageDataset, count: int = CHECK_IMAGES) -> torch.Tensor:
    """What each speed-up (BatchNorm folding, the memory layout, --compile) is checked on, N x 3 x H x W as the
    decoders make it: up to `count` of the run's own images spread over its list, decoded as the workers decode
    them (unreadable ones skipped), and one seeded random image. Real images reach the branches a model takes on
    real input, which one random tensor may never do."""
    total = len(dataset)
    picks = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)}) if total else []
    decoded = [image for _, image, error, _ in (dataset[index] for index in picks) if not error]
    return torch.stack([*decoded, seeded_images(dataset.blank, 1)[0]])


def collate(samples: list[tuple[int, torch.Tensor, str, str]]) -> Batch:
    indices, images, errors, seen = zip(*samples, strict=True)
    return Batch(list(indices), torch.stack(images), list(errors), list(seen))


PREFETCH = 4  # batches each worker keeps ready
SHM_SHARE = 0.5  # of /dev/shm's free space the in-flight batches may take


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def fit_to_shm(workers: int, batch_bytes: int, shm_free: int | None) -> tuple[int, int, str | None]:
    """Workers and prefetch depth whose in-flight batches fit in /dev/shm, and a warning when cut.

    Worker batches travel through shared memory; Docker's default /dev/shm is 64 MB, and overflowing it kills
    the run with a bus error. So the pipeline gets shallower, then narrower, and at worst decodes in-process.
    """
    if workers == 0 or shm_free is None:
        return workers, PREFETCH, None
    budget = int(shm_free * SHM_SHARE)
    prefetch = min(PREFETCH, budget // max(1, workers * batch_bytes))
    if prefetch >= PREFETCH:
        return workers, PREFETCH, None
    fitted = workers if prefetch >= 1 else budget // batch_bytes
    prefetch = max(1, prefetch)
    shm_mb = shm_free // 2**20
    if fitted == 0:
        return (
            0,
            PREFETCH,
            (
                f"/dev/shm has {shm_mb} MB free, less than two batches of images: decoding in the main process. "
                "Give the container more (docker run --shm-size=2g) or lower --batch_size"
            ),
        )
    return (
        fitted,
        prefetch,
        (
            f"/dev/shm has {shm_mb} MB free: using {fitted} workers with {prefetch} batch(es) prefetched each. "
            "For full speed run the container with --shm-size=2g"
        ),
    )


OPEN_FILES_BASE = 32  # what the process holds besides its decoders: libraries, outputs, its lock and the gate
OPEN_FILES_PER_BATCH, OPEN_FILES_PER_WORKER = 1, 4  # a shared batch in flight; a worker's pipes and queues


def fit_to_open_files(workers: int, prefetch: int, limit: int) -> tuple[int, str | None]:
    """Workers whose pipes and batches in flight fit in the open-files limit, and a line when cut (was: "Too many
    open files" from inside torch, mid-run)."""
    each = OPEN_FILES_PER_WORKER + prefetch * OPEN_FILES_PER_BATCH
    fitted = min(workers, max(0, (limit - OPEN_FILES_BASE) // each))
    if fitted == workers:
        return workers, None
    return fitted, (
        f"the open-files limit ({limit}, ulimit -n) allows {fitted} decoding worker(s) here, not {workers}: raise "
        "it (ulimit -n 4096, or docker run --ulimit nofile=4096) for full speed"
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    prefetch: int,
    pin_memory: bool,
    timeout: float | None,
    idle_workers: bool,
) -> DataLoader:
    """The workers' DataLoader; with `idle_workers` each worker first drops to the lowest CPU priority
    (harness/pipeline/host.py: yield_cores)."""
    extra: dict[str, Any] = {"prefetch_factor": prefetch, "timeout": timeout or 0} if workers > 0 else {}
    if workers > 0 and idle_workers:
        extra["worker_init_fn"] = _yield_cores
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        **extra,
    )


def _yield_cores(worker_id: int) -> None:
    yield_cores()
