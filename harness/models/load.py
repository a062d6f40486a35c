"""Which kind of model the model folder holds, and loading it: an ONNX file, a saved TorchScript or pickled module,
or a Python class with a state_dict checkpoint. Every kind comes back as an `nn.Module` the pipeline calls alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.config import Config
from harness.errors import ModelError
from harness.models.checkpoint import load_weights, read_state_dict, resolve_checkpoint
from harness.models.onnx_runtime import OnnxModule, make_session
from harness.models.python_class import DEFAULT_CLASS, MODULE_FILES, create_model, find_module_file
from harness.models.saved import SAVED_SUFFIXES, load_saved_model


@dataclass
class LoadedModel:
    module: nn.Module
    class_name: str
    source: str
    checkpoint: str | None
    parameters: int | None  # None for an ONNX model: onnxruntime does not expose its weights

    def describe(self, classes: int, transform: str) -> dict[str, object]:
        """The model as run.json records it."""
        return {
            "class": self.class_name,
            "source": self.source,
            "checkpoint": self.checkpoint,
            "parameters": self.parameters,
            "classes": classes,
            "transform": transform,
        }


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


def load_class_model(config: Config) -> LoadedModel:
    path = find_module_file(config)
    class_name = config.class_name or DEFAULT_CLASS
    model = create_model(path, class_name)
    checkpoint = resolve_checkpoint(config)
    if checkpoint is not None:
        load_weights(model, read_state_dict(checkpoint), checkpoint)
    model.eval()
    return LoadedModel(
        module=model,
        class_name=class_name,
        source=str(path),
        checkpoint=str(checkpoint) if checkpoint else None,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def load_model(config: Config) -> LoadedModel:
    onnx_path = find_saved_file(config, (".onnx",))
    if onnx_path is not None:
        return load_onnx_model(onnx_path, config)
    saved_path = find_saved_file(config, SAVED_SUFFIXES)
    if saved_path is not None:
        return load_whole_model(saved_path, config)
    return load_class_model(config)
