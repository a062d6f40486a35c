"""A model folder's Python: its model file, the class in it, and the ObjectNet template's transform hook.

User code is imported with its folder on sys.path, and a failure inside it is reported as the file and line in
the user's folder where it broke, not as the harness's stack.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from harness.config import Config
from harness.errors import ModelError, describe_user_error
from harness.models.kinds import MODULE_FILES

DEFAULT_CLASS = "Model"


def import_file(path: Path, name: str) -> ModuleType:
    """Import a user file as a module, its folder on sys.path so its own imports of sibling files work."""
    folder = str(path.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # user code: report where it broke, not our stack
        del sys.modules[name]
        raise ModelError(f"importing {path} failed: {where(error, path)}") from error
    return module


def where(error: BaseException, path: Path) -> str:
    """'Type: message (file:line)' for the innermost frame in the user's folder, else the innermost frame."""
    frames = traceback.extract_tb(error.__traceback__)
    folder = str(path.parent.resolve())
    inside = [frame for frame in frames if str(Path(frame.filename).resolve()).startswith(folder)]
    frame = (inside or frames or [None])[-1]
    place = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{describe_user_error(error)}{place}"


def find_module_file(config: Config) -> Path:
    folder = config.model_dir
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist: put your model's code in model/ or pass --model-dir")
    if config.module:
        path = folder / config.module
        if not path.is_file():
            raise ModelError(f"{path} does not exist (set by 'module')")
        return path
    for name in MODULE_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"model folder {folder} holds neither {' nor '.join(MODULE_FILES)}: add the file with your class")


def _module_classes(module: ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__
    )


def create_model(path: Path, class_name: str) -> nn.Module:
    """An instance of `class_name` from the user's file, built with no arguments (the template's contract)."""
    module = import_file(path, "harness_user_model")
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        classes = _module_classes(module)
        raise ModelError(
            f"{path} has no model class '{class_name}'. Classes there: {', '.join(classes) or 'none'}. "
            "Set MODEL_CLASS_NAME, class_name in config.yaml, or the third positional argument."
        )
    try:
        return cls()
    except (Exception, SystemExit) as error:
        raise ModelError(f"creating {class_name}() failed: {where(error, path)}") from error


def load_custom_transform(config: Config) -> Callable[[Any], torch.Tensor] | None:
    """The template's `data_transform().getTransform()` when the model folder has one, else None."""
    path = config.transform_file
    if not path.is_file():
        return None
    module = import_file(path, "data_transform_description")
    maker = getattr(module, "data_transform", None)
    if maker is None or not hasattr(maker, "getTransform"):
        raise ModelError(f"{path} must define class data_transform with a getTransform() method")
    try:
        return maker().getTransform()
    except (Exception, SystemExit) as error:
        raise ModelError(f"data_transform().getTransform() failed: {where(error, path)}") from error
