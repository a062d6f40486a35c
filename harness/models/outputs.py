"""What a model returns, read as N x C scores: the one adapter the run and the tools (check-model, export-onnx)
share, so every place accepts the same outputs and rejects the same with the same message."""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import ModelError

# How far two ways of running one model (the memory layouts, BatchNorms folded or not) may move its scores and still
# count as the same model: float32 rounding moves them in the last digits, a real difference far beyond.
SAME_RTOL, SAME_ATOL = 1e-3, 1e-4


def same_scores(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether `got` is `expected` run another way (folded, compiled, exported): the same shape, and each score
    within SAME_RTOL of itself plus SAME_ATOL of the largest (at least 1)."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=SAME_RTOL, atol=SAME_ATOL * scale)


def as_logits(output: Any, batch: int) -> torch.Tensor:
    """The model's scores as N x C real numbers: a tensor, a dict's or an object's `logits` (Hugging Face). A
    one-dimensional output of N numbers is one score column. Anything else is refused, naming what came back:
    a tuple (which of its items are the scores?), integer ids (an argmax has no confidences), booleans, complex
    numbers, no classes at all."""
    if isinstance(output, dict) or hasattr(output, "logits"):
        logits = output.get("logits") if isinstance(output, dict) else output.logits
        if logits is None:
            keys = ", ".join(map(str, output)) if isinstance(output, dict) else type(output).__name__
            raise ModelError(f"the model returned {keys} without 'logits'; it must return its N x C scores")
        output = logits
    elif isinstance(output, (tuple, list)):
        raise ModelError(
            f"the model returned a {type(output).__name__} of {len(output)} items; return the N x C scores tensor "
            "itself (or a dict with 'logits'), so the harness never guesses which item holds them"
        )
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"the model returned {type(output).__name__}; it must return a tensor of N x C scores")
    if not output.dtype.is_floating_point:
        kind = "class ids (an argmax?)" if not output.dtype.is_complex and output.dtype != torch.bool else "no scores"
        raise ModelError(
            f"the model returned {output.dtype} values, {kind}: it must return real-valued N x C scores (logits or "
            "probabilities)"
        )
    if output.dim() == 1 and output.shape[0] == batch:
        output = output.unsqueeze(1)
    if output.dim() != 2 or output.shape[0] != batch:
        raise ModelError(f"the model returned shape {tuple(output.shape)} for {batch} images; expected ({batch}, C)")
    if output.shape[1] < 1:
        raise ModelError(f"the model returned shape {tuple(output.shape)}: no classes; expected ({batch}, C >= 1)")
    return output
