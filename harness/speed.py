"""Process-level speed settings, applied once in the main process before the model and the workers start.

DataLoader workers are forked afterwards and inherit the malloc settings (harness/host.py says why they pay).
"""

from __future__ import annotations

import torch

from harness.config import Config
from harness.host import keep_freed_memory, usable_cpus


def tune_process(config: Config) -> dict[str, object]:
    """Apply the run's speed settings; returns what was applied, for run.json."""
    kept = keep_freed_memory() if config.keep_freed_memory else False
    # torch counts the host's cores; a container's CPU quota (docker --cpus) or affinity may allow far fewer.
    # Only ever lowered by default, so torchrun's one thread per process stays.
    torch.set_num_threads(config.threads if config.threads is not None else min(torch.get_num_threads(), usable_cpus()))
    return {"keep_freed_memory": kept, "torch_threads": torch.get_num_threads()}
