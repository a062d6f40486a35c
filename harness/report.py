"""What a run tells its user: messages and a progress bar on stderr (readable in `docker logs`), a closing line,
and run.json beside the predictions with the effective configuration, model, devices and timings."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import __version__
from harness.writer import write_atomic_text


def say(message: str) -> None:
    """One line on stderr that does not tear an active progress bar."""
    tqdm.write(f"harness: {message}", file=sys.stderr)


def progress_bar(total: int, enabled: bool) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        unit="img",
        desc="classifying",
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
        smoothing=0.1,
    )


@dataclass
class RunReport:
    """Filled in as the run goes; written as run.json at the end (also when the run stops early)."""

    config: dict[str, Any]
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    failures: int = 0
    status: str = "running"

    def timed(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round(now - since, 4)
        return now

    @property
    def images_per_second(self) -> float:
        seconds = self.timings.get("total_s", 0.0)
        return self.images / seconds if seconds > 0 else 0.0

    def closing_line(self, output: Path) -> str:
        return (
            f"harness: {self.images} images, {self.failures} failed, {self.timings.get('total_s', 0.0):.1f} s, "
            f"{self.images_per_second:.1f} images/s -> {output}"
        )

    def write(self, path: Path) -> None:
        data = {
            "harness_version": __version__,
            "status": self.status,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "images": self.images,
            "failures": self.failures,
            "images_per_s": round(self.images_per_second, 2),
            "timings": self.timings,
            **self.details,
            "config": self.config,
        }
        write_atomic_text(path, json.dumps(data, indent=2, default=str) + "\n")
