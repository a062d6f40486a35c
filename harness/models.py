"""Loading the user's model from the model folder: its Python file, class, checkpoint and optional transform.

Checkpoints load with `weights_only=True`: a state_dict holds tensors, and nothing in one needs to run code.
"""

from __future__ import annotations

import importlib.util
import inspect
import pickle
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from harness.config import Config
from harness.errors import ModelError
from harness.onnx_model import OnnxModule, make_session
from harness.saved_models import SAVED_SUFFIXES, load_saved_model

MODULE_FILES = ("model.py", "model_description.py")  # ours / the AISafety contract, then the ObjectNet template's
DEFAULT_CLASS = "Model"
NESTED_KEYS = ("state_dict", "model", "model_state_dict")


@dataclass
class LoadedModel:
    module: nn.Module
    class_name: str
    source: str
    checkpoint: str | None
    parameters: int | None  # None for an ONNX model: onnxruntime does not expose its weights


def _import_file(path: Path, name: str) -> ModuleType:
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
    except Exception as error:  # user code: report where it broke, not our stack
        del sys.modules[name]
        raise ModelError(f"importing {path} failed: {_where(error, path)}") from None
    return module


def _where(error: BaseException, path: Path) -> str:
    """'Type: message (file:line)' for the innermost frame in the user's folder, else the innermost frame."""
    frames = traceback.extract_tb(error.__traceback__)
    folder = str(path.parent.resolve())
    inside = [frame for frame in frames if str(Path(frame.filename).resolve()).startswith(folder)]
    frame = (inside or frames or [None])[-1]
    place = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {error}{place}"


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
        if "Unsupported global" not in str(error):
            raise ModelError(f"{path} is not a PyTorch checkpoint (it does not unpickle)") from None
        objects = re.findall(r"GLOBAL ([\w.]+)", str(error))
        raise ModelError(
            f"{path} holds pickled Python objects ({', '.join(objects) or 'not only tensors'}), so it is not loaded: "
            "that would run code from the file. Save the weights with torch.save(model.state_dict(), ...)."
        ) from None
    except Exception as error:
        raise ModelError(f"{path} is not a PyTorch checkpoint: {type(error).__name__}: {error}") from None
    for key in NESTED_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module.") :]: v for k, v in data.items()}
    return data


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
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


def find_saved_file(config: Config, suffixes: tuple[str, ...]) -> Path | None:
    """A saved model (ONNX, TorchScript, pickle): named by `module`, or the folder's only file with one of
    `suffixes` when the folder holds no Python model file."""
    folder = config.model_dir
    if config.module:
        return folder / config.module if config.module.lower().endswith(suffixes) else None
    if not folder.is_dir() or any((folder / name).is_file() for name in MODULE_FILES):
        return None
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if len(found) > 1:
        raise ModelError(f"model folder {folder} holds {len(found)} {'/'.join(suffixes)} files: name one with --module")
    return found[0] if found else None


def load_onnx_model(path: Path, config: Config) -> LoadedModel:
    if not path.is_file():
        raise ModelError(f"{path} does not exist (set by 'module')")
    want_cuda = config.device != "cpu" and config.gpus != 0 and torch.cuda.is_available()
    module = OnnxModule(make_session(path, want_cuda))
    return LoadedModel(
        module=module,
        class_name=f"ONNX ({', '.join(module.providers)})",
        source=str(path),
        checkpoint=None,
        parameters=None,
    )


def load_whole_model(path: Path, config: Config) -> LoadedModel:
    if not path.is_file():
        raise ModelError(f"{path} does not exist (set by 'module')")
    model, kind = load_saved_model(path, config.trust_pickle)
    model.eval()
    return LoadedModel(
        module=model,
        class_name=f"{kind} {type(model).__name__}",
        source=str(path),
        checkpoint=None,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def load_model(config: Config) -> LoadedModel:
    onnx_path = find_saved_file(config, (".onnx",))
    if onnx_path is not None:
        return load_onnx_model(onnx_path, config)
    saved_path = find_saved_file(config, SAVED_SUFFIXES)
    if saved_path is not None:
        return load_whole_model(saved_path, config)
    path = find_module_file(config)
    module = _import_file(path, "harness_user_model")
    class_name = config.class_name or DEFAULT_CLASS
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        classes = _module_classes(module)
        raise ModelError(
            f"{path} has no model class '{class_name}'. Classes there: {', '.join(classes) or 'none'}. "
            "Set MODEL_CLASS_NAME, class_name in config.yaml, or the third positional argument."
        )
    try:
        model = cls()
    except Exception as error:
        raise ModelError(f"creating {class_name}() failed: {_where(error, path)}") from None
    checkpoint = resolve_checkpoint(config)
    if checkpoint is not None:
        _load_weights(model, read_state_dict(checkpoint), checkpoint)
    model.eval()
    return LoadedModel(
        module=model,
        class_name=class_name,
        source=str(path),
        checkpoint=str(checkpoint) if checkpoint else None,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def load_custom_transform(config: Config) -> Callable[[Any], torch.Tensor] | None:
    """The template's `data_transform().getTransform()` when the model folder has one, else None."""
    path = config.transform_file
    if not path.is_file():
        return None
    module = _import_file(path, "data_transform_description")
    maker = getattr(module, "data_transform", None)
    if maker is None or not hasattr(maker, "getTransform"):
        raise ModelError(f"{path} must define class data_transform with a getTransform() method")
    try:
        return maker().getTransform()
    except Exception as error:
        raise ModelError(f"data_transform().getTransform() failed: {_where(error, path)}") from None
