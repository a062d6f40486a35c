"""Whole saved models, for model folders with no Python class: TorchScript archives, and pickled modules.

A TorchScript archive holds its code as TorchScript, which `torch.jit.load` compiles without running Python
from the file. A pickled `nn.Module` (`torch.save(model)`) runs arbitrary code while it loads, so it is loaded
only with an explicit `--trust-pickle`; state_dict checkpoints always stay `weights_only=True`.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from harness.errors import ModelError


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a `code/` folder; `torch.save` archives have only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def holds_weights_only(path: Path) -> bool:
    """Whether the file is a state_dict or training checkpoint: it loads with weights_only=True (which runs no
    code from the file) and holds no module."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(data, dict) and not any(isinstance(value, nn.Module) for value in data.values())


def load_saved_model(path: Path, trust_pickle: bool) -> tuple[nn.Module, str]:
    """(module, kind) for a TorchScript archive, or a pickled module when trusted."""
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                return torch.jit.load(str(path), map_location="cpu"), "TorchScript"
        except Exception as error:
            raise ModelError(f"{path} is not a loadable TorchScript archive: {error}") from None
    if holds_weights_only(path):
        raise ModelError(
            f"{path} holds weights only (a state_dict), not a model: give the code that builds the model too, as "
            f"--model model.py --checkpoint {path} (a model.py with the class), or --model timm:NAME --checkpoint "
            f"{path} for a timm model"
        )
    if not trust_pickle:
        raise ModelError(
            f"{path} is not TorchScript, so it may be a whole pickled model, which runs code from the file as it "
            "loads. Pass --trust-pickle if you trust its author, or ship a model.py with a state_dict, TorchScript "
            "or ONNX instead."
        )
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelError(f"unpickling {path} failed: {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{path} holds a {type(model).__name__}, not a model (an nn.Module)")
    return model, "pickled module"
