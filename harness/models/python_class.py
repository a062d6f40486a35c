"""A model folder's Python: its model file, the class in it, and the ObjectNet template's transform hook.

User code is imported with its folder on sys.path, and a failure inside it is reported as the file and line in
the user's folder where it broke, not as the harness's stack.
"""

from __future__ import annotations

import ast
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
from harness.console import say
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
    """The Python file the class comes from: `module` when set, else model.py or the template's
    model_description.py; when the folder holds both (the template's file copied beside the example's), the one
    that defines the class, said in one line."""
    folder = config.model_dir
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist: put your model's code in model/ or pass --model-dir")
    if config.module:
        path = folder / config.module
        if not path.is_file():
            raise ModelError(f"{path} does not exist (set by 'module')")
        return path
    present = [folder / name for name in MODULE_FILES if (folder / name).is_file()]
    if not present:
        raise ModelError(
            f"model folder {folder} holds neither {' nor '.join(MODULE_FILES)}: add the file with your class"
        )
    wanted = config.class_name or DEFAULT_CLASS
    defining = [path for path in present if wanted in defined_classes(path)]
    if len(present) > 1 and len(defining) == 1 and defining[0] != present[0]:
        say(f"class {wanted} is in {defining[0]}, not {present[0]}: using {defining[0].name} (--module chooses)")
        return defining[0]
    return present[0]


def defined_classes(path: Path) -> list[str]:
    """The classes a Python file defines at its top level, read without running it."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []
    return [node.name for node in tree.body if isinstance(node, ast.ClassDef)]


def _module_classes(module: ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__
    )


def _required_arguments(cls: type) -> list[str]:
    """The constructor's parameters that have no default: the harness (as the template) passes none."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


def create_model(path: Path, class_name: str) -> nn.Module:
    """An instance of `class_name` from the user's file, built with no arguments (the template's contract)."""
    module = import_file(path, "harness_user_model")
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        classes = _module_classes(module)
        others = [name for name in MODULE_FILES if name != path.name and (path.parent / name).is_file()]
        elsewhere = (
            f"; the folder also holds {others[0]}: --module {others[0]} takes the class from there" if others else ""
        )
        raise ModelError(
            f"{path} has no model class '{class_name}'. Classes there: {', '.join(classes) or 'none'}. "
            "Set MODEL_CLASS_NAME, class_name in config.yaml, or the third positional argument; --module FILE or "
            f"--model-dir FOLDER load another file or folder{elsewhere}."
        )
    required = _required_arguments(cls)
    if required:
        raise ModelError(
            f"{class_name}() needs arguments ({', '.join(required)}), and the harness builds your class with none, "
            f"as the template does: give them defaults in {path.name}, or add a subclass whose __init__ passes them"
        )
    try:
        return cls()
    except (Exception, SystemExit) as error:
        raise ModelError(f"creating {class_name}() failed: {where(error, path)}") from error


def load_custom_transform(path: Path | None) -> Callable[[Any], torch.Tensor] | None:
    """The template's `data_transform().getTransform()` from the model folder's file (harness/pipeline/
    decode_options.py: Decoding.transform_file), or None where it has none."""
    if path is None:
        return None
    module = import_file(path, "data_transform_description")
    maker = getattr(module, "data_transform", None)
    if maker is None or not hasattr(maker, "getTransform"):
        raise ModelError(f"{path} must define class data_transform with a getTransform() method")
    try:
        return maker().getTransform()
    except (Exception, SystemExit) as error:
        raise ModelError(f"data_transform().getTransform() failed: {where(error, path)}") from error
