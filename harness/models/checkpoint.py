"""Checkpoints: finding the file, reading its tensors without running code, and fitting them to a model.

A checkpoint is a plain state_dict, a training checkpoint that holds one (timm's train.py saves `state_dict`,
`state_dict_ema`, the optimizer and its `args`), or a .safetensors file. Pickled checkpoints load with
`weights_only=True`, which runs no code from the file; like timm, it also allows `argparse.Namespace`, the one
class a training checkpoint's `args` needs. Any other pickled object is refused.
"""

from __future__ import annotations

import argparse
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.config import Config
from harness.console import say
from harness.errors import ModelError, refused_pickle_globals

NESTED_KEYS = ("state_dict", "model", "model_state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema")
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")  # torch.compile around DDP, DDP, torch.compile
SAFE_CLASSES = [argparse.Namespace]  # a training checkpoint's `args`, as timm allows it


def resolve_checkpoint(config: Config) -> Path | None:
    """A checkpoint path as given (absolute or from the working directory, as the template took it), else in the
    model folder."""
    if not config.checkpoint:
        return None
    given = Path(config.checkpoint)
    for candidate in (given, config.model_dir / given, config.model_dir / given.name):
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in config.model_dir.iterdir() if p.is_file()) if config.model_dir.is_dir() else []
    raise ModelError(
        f"checkpoint {config.checkpoint} not found (looked in the working directory and {config.model_dir}). "
        f"Files in {config.model_dir}: {', '.join(present) or 'none'}"
    )


def _load_file(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelError(
                f"{path} is a safetensors file, and safetensors is not installed: pip install safetensors"
            ) from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError for a damaged header
            raise ModelError(f"{path} is not a readable safetensors file: {error}") from error
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        objects = refused_pickle_globals(error)
        if objects is None:
            raise ModelError(f"{path} is not a PyTorch checkpoint (it does not unpickle)") from error
        raise ModelError(
            f"{path} holds pickled Python objects ({', '.join(objects) or 'not only tensors'}), so it is not loaded: "
            "that would run code from the file. Save the weights with torch.save(model.state_dict(), ...)."
        ) from error
    except Exception as error:
        raise ModelError(f"{path} is not a PyTorch checkpoint: {type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class Weights:
    """A checkpoint's tensors and which of its entries they are (None for a bare state_dict), for run.json."""

    state: dict[str, torch.Tensor]
    entry: str | None

    @property
    def is_ema(self) -> bool:
        return self.entry in EMA_KEYS


def read_state_dict(path: Path, ema: bool | None = None) -> Weights:
    """The tensors of a checkpoint, unwrapped from a training checkpoint's dict and DataParallel's prefix. Which
    weights follow timm's load_checkpoint(use_ema=True), as `create_model(checkpoint_path=...)` and timm's
    inference.py load them: the EMA weights where the file holds them (`ema` unset), unless `ema` is False; `ema`
    True requires them. When the file holds both, one line says which were used."""
    data: Any = _load_file(path)
    entries = data if isinstance(data, dict) else {}
    ema_key = next((k for k in EMA_KEYS if isinstance(entries.get(k), dict)), None)
    own_key = next((k for k in NESTED_KEYS if isinstance(entries.get(k), dict)), None)
    if ema and ema_key is None:
        held = ", ".join(sorted(map(str, data))[:10]) if isinstance(data, dict) else type(data).__name__
        raise ModelError(f"--ema: {path} holds no EMA weights ({' or '.join(EMA_KEYS)}); it holds: {held}")
    key = ema_key if ema_key is not None and ema is not False else own_key
    if ema_key is not None and own_key is not None:
        rule = "--ema false" if ema is False else "--ema true" if ema else "timm's rule; --ema false for its own"
        say(f"{path.name} holds its own weights ({own_key}) and EMA weights ({ema_key}): using {key} ({rule})")
    if key is not None:
        data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    if data and all(k.startswith(WRAPPER_PREFIXES) for k in data):  # a wrapper prefixes every name
        data = {_unwrapped(k): v for k, v in data.items()}
    return Weights(data, key)


def _unwrapped(key: str) -> str:
    """A parameter's name without the prefixes DataParallel and torch.compile add, as timm's clean_state_dict."""
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of the model from the file, or one message listing what is missing, extra or mis-shaped."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", mismatched)):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise ModelError(f"{path} does not fit the model class. " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
