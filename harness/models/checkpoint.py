"""State_dict checkpoints: finding the file, reading its tensors without running code, and fitting them to a class.

Checkpoints load with `weights_only=True`: a state_dict holds tensors, and nothing in one needs to run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.config import Config
from harness.errors import ModelError, refused_pickle_globals

NESTED_KEYS = ("state_dict", "model", "model_state_dict")


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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapped from a training checkpoint's dict and DataParallel's prefix."""
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
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
    for key in NESTED_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module.") :]: v for k, v in data.items()}
    return data


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
