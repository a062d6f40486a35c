"""What a model returns, read as N x C scores: the one adapter the run and the tools (check-model, export-onnx)
share, so every place accepts the same outputs and rejects the same with the same message."""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import ModelError

# How far two ways of running one model (the memory layouts, BatchNorms folded or not) may move its scores and still
# count as the same model: float32 rounding moves them in the last digits, a real difference far beyond.
SAME_RTOL, SAME_ATOL = 1e-3, 1e-4


def as_logits(output: Any, batch: int) -> torch.Tensor:
    """The model's scores as N x C: plain tensors, the first of a tuple, or a dict's 'logits' (Hugging Face)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and "logits" in output:
        output = output["logits"]
    elif hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"the model returned {type(output).__name__}; it must return a tensor of N x C scores")
    if output.dim() == 1 and output.shape[0] == batch:
        output = output.unsqueeze(1)
    if output.dim() != 2 or output.shape[0] != batch:
        raise ModelError(f"the model returned shape {tuple(output.shape)} for {batch} images; expected ({batch}, C)")
    return output
