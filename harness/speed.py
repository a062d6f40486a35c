"""Process-level speed settings, applied once in the main process before the model and the workers start.

Both are measured by scripts/bench.py (figures in docs/benchmarks.md): on the CPU, glibc handed the big activation
blocks back to the kernel after every batch and faulted them in again on the next, so a run spent as much time in
the kernel as in the model. DataLoader workers are forked afterwards and inherit the malloc settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from harness.config import Config
from harness.devices import usable_cpus

M_TRIM_THRESHOLD = -1  # glibc's mallopt() parameter numbers (malloc.h)
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 2**31 - 1  # the largest trim threshold mallopt takes: freed memory stays in the heap


def keep_freed_memory() -> bool:
    """Serve big blocks from the heap instead of fresh mmaps and never trim it: no page faults per batch.

    The peak stays what one batch needs (freed blocks are reused, not added up). False where libc is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def tune_process(config: Config) -> dict[str, object]:
    """Apply the run's speed settings; returns what was applied, for run.json."""
    kept = keep_freed_memory() if config.keep_freed_memory else False
    # torch counts the host's cores; a container's CPU quota (docker --cpus) or affinity may allow far fewer.
    # Only ever lowered by default, so torchrun's one thread per process stays.
    torch.set_num_threads(config.threads if config.threads is not None else min(torch.get_num_threads(), usable_cpus()))
    return {"keep_freed_memory": kept, "torch_threads": torch.get_num_threads()}
