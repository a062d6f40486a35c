"""What a run reports: its closing line, and run.json beside the predictions with the effective configuration,
the model, devices, decoding set-up and timings. The run fills the report in as it decides each thing; run.json is
written at the end, also when the run stops early."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import __version__
from harness.config import Preprocess
from harness.results.writer import write_atomic_text

# The packages whose versions can move a run's numbers or its behaviour: what run.json records, so a CSV can be
# reproduced with the same ones (constraints.txt locks them; an unlocked install may differ).
RECORDED_PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "pyspng",
    "zlib-ng",
    "safetensors",
    "pyyaml",
    "onnxruntime",
    "onnxruntime-gpu",
    "timm",
    "transformers",
)


def software() -> dict[str, Any]:
    """Python, the recorded packages that are installed, and the CPU kernels torch picked (AVX2, AVX-512, ...):
    another kernel set rounds the scores differently in their last digits."""
    packages: dict[str, str] = {}
    for name in RECORDED_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "packages": packages,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability() if torch is not None else None,
    }


def distributions() -> list[str]:
    """Every installed distribution as its metadata folder names it (`torch-2.14.1.dist-info`), on the import
    path: a version that changes changes its name. Read from the folders' names alone, so it costs a few
    listings, not a read of each package's metadata."""
    found = set()
    for entry in sys.path:
        with contextlib.suppress(OSError):
            found.update(name for name in os.listdir(entry or ".") if name.endswith((".dist-info", ".egg-info")))
    return sorted(found)


SHOWN_PREPROCESSING = (  # what decides the pixels the model sees, in the order the line shows them
    "border",
    "resize_mode",
    "resize_size",
    "crop_pct",
    "interpolation",
    "input_size",
    "crop_offset",
    "channel_order",
    "value_scale",
    "mean",
    "std",
)


def describe_preprocessing(pre: Preprocess, transform: Path | None = None) -> str:
    """The preprocessing as it really runs, in one phrase: the model folder's own transform where it has one."""
    if transform is not None:
        return f"{transform} (the template's transform hook), after stripping a {pre.border} px frame"
    normalise = "no normalisation" if pre.mean is None else f"mean {_numbers(pre.mean)}, std {_numbers(pre.std)}"
    sides = "both sides" if pre.resize_mode == "squash" else "shorter side"
    crop = f"centre crop {pre.input_size}" + (" (offset floor)" if pre.crop_offset == "floor" else "")
    if pre.resize_mode == "squash" and pre.resize_to == pre.input_size:
        crop = "no crop"
    return (
        f"border {pre.border}, {sides} to {pre.resize_to} ({pre.interpolation}), {crop}, "
        f"{pre.channel_order.upper()}, values 0..{pre.value_scale:g}, {normalise}"
    )


def _numbers(values: tuple[float, ...] | None) -> str:
    return ",".join(f"{value:g}" for value in values or ())


def preprocessing_sources(origins: Mapping[str, str], transform: Path | None = None) -> str:
    """Where the preprocessing came from, in a few words: the source most of it came from, and the settings that
    came from elsewhere; the harness's defaults (torchvision's ImageNet recipe) said as such."""
    if transform is not None:
        return f"{transform}"
    given = {name: origins[name] for name in SHOWN_PREPROCESSING if name in origins}
    if not given:
        return "the harness's defaults, torchvision's ImageNet recipe: set your model's in model/config.yaml"
    main = Counter(given.values()).most_common(1)[0][0]
    others = sorted(f"{name} from {source}" for name, source in given.items() if source != main)
    return "; ".join([f"from {main}", *others])


@dataclass
class RunReport:
    config: dict[str, Any]
    output: str
    total: int = 0  # images the run covers: what --max-failures' fraction is of
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    images: int = 0
    failures: int = 0
    status: str = "running"
    model: dict[str, Any] = field(default_factory=dict)
    label_map: str = ""
    columns: int = 0  # fields per CSV row
    scorer_rules: bool = False  # the file is the challenge's shape: every rule of its scorer holds it (contract.py)
    devices: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    prefetch_batches: int = 0
    batch_size_total: int = 0
    resumed_rows: int = 0
    head_start_images: int = 0
    tuning: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)  # the memory layout, and how it was chosen
    fold_batchnorm: dict[str, Any] = field(default_factory=dict)  # BatchNorms folded, or why none
    engine: dict[str, Any] = field(default_factory=dict)  # what runs the model, and how it was chosen
    world_size: int = 1
    confinement: dict[str, Any] = field(default_factory=dict)  # what the run could reach (pipeline/confine.py)
    preprocessing: dict[str, Any] = field(default_factory=dict)  # as it runs, and where each value came from
    skipped: list[str] = field(default_factory=list)  # files under the input that are not images

    def timed(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round(now - since, 4)
        return now

    @property
    def images_per_second(self) -> float:
        seconds = self.timings.get("total_s", 0.0)
        return self.images / seconds if seconds > 0 else 0.0

    def closing_line(self) -> str:
        skipped = f", {len(self.skipped)} other file(s) skipped (not images: run.json lists them)" * bool(self.skipped)
        return (
            f"harness: {self.images} images, {self.failures} failed{skipped}, "
            f"{self.timings.get('total_s', 0.0):.1f} s, {self.images_per_second:.1f} images/s -> {self.output}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "harness_version": __version__,
            "status": self.status,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "images": self.images,
            "failures": self.failures,
            "skipped_files": self.skipped,
            "images_per_s": round(self.images_per_second, 2),
            "timings": self.timings,
            "model": self.model,
            "label_map": self.label_map,
            "scorer_rules": self.scorer_rules,
            "devices": self.devices,
            "workers": self.workers,
            "prefetch_batches": self.prefetch_batches,
            "batch_size_total": self.batch_size_total,
            "resumed_rows": self.resumed_rows,
            "head_start_images": self.head_start_images,
            "tuning": self.tuning,
            "layout": self.layout,
            "fold_batchnorm": self.fold_batchnorm,
            "engine": self.engine,
            "world_size": self.world_size,
            "preprocessing": self.preprocessing,
            "confinement": self.confinement,
            "software": software(),
            "output": self.output,
            "config": self.config,
        }

    def write(self, path: Path) -> None:
        write_atomic_text(path, json.dumps(self.to_json(), indent=2, default=str) + "\n")
