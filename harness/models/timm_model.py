"""A timm model by name (`--model timm:NAME`), built offline (no pretrained download) and filled from a checkpoint:
a state_dict, a .safetensors file, or a training checkpoint as timm's train.py saves it, its EMA weights chosen as
timm chooses them (harness/models/checkpoint.py). With no `--num-classes`, the head is sized from the checkpoint's
classifier, else timm's default. Weights are never downloaded, so a model with no checkpoint is refused: random
weights would give a CSV that looks right and means nothing."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.config import Config
from harness.errors import ModelError, describe_user_error
from harness.models.checkpoint import Weights, load_weights, read_state_dict, resolve_checkpoint
from harness.models.preprocessing import import_timm, timm_name, timm_pretrained_cfg


def _head_classes(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """The classes the checkpoint's classifier has (timm names the classifier in the model's pretrained config)."""
    cfg = timm_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for head in heads:
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def load_timm_model(config: Config) -> tuple[nn.Module, str, Path, Weights]:
    """(model in eval mode, its description, the checkpoint used, the weights read from it)."""
    timm = import_timm()
    name = timm_name(config)
    checkpoint = resolve_checkpoint(config)
    if checkpoint is None:
        raise ModelError(f"timm:{name} needs its weights: pass --checkpoint FILE (the harness never downloads them)")
    weights = read_state_dict(checkpoint, config.ema)
    classes = config.num_classes or _head_classes(name, weights.state)
    extra = {"num_classes": classes} if classes else {}
    try:
        model = timm.create_model(name, pretrained=False, **extra)
    except Exception as error:  # an unknown name was caught earlier; this is timm refusing the arguments
        raise ModelError(f"timm could not build {name}: {describe_user_error(error)}") from error
    load_weights(model, weights.state, checkpoint)
    return model.eval(), f"timm {name}" + (" (EMA weights)" if weights.is_ema else ""), checkpoint, weights
