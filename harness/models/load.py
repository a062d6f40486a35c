"""The loaders of the kinds in harness/models/kinds.py: a Python class with its checkpoint, a timm model, a Hugging
Face folder, an ONNX file, a saved TorchScript or pickled module. Every kind comes back as an `nn.Module` the
pipeline calls alike, with its kind, so what the harness may do to it is the kind's to say."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.config import Config
from harness.errors import model_code
from harness.models.checkpoint import load_weights, read_state_dict, resolve_checkpoint
from harness.models.hf_model import load_hf_model
from harness.models.kinds import CLASS, DEFAULT_KIND, HF, ONNX, SAVED, TIMM, ModelKind, kind_file, kind_of
from harness.models.onnx_metadata import read_labels
from harness.models.onnx_runtime import OnnxModule, make_session
from harness.models.preprocessing import HF_CONFIG
from harness.models.python_class import DEFAULT_CLASS, create_model, find_module_file
from harness.models.reads import watch_reads
from harness.models.saved import load_saved_model
from harness.models.timm_model import load_timm_model


@dataclass
class LoadedModel:
    module: nn.Module
    class_name: str
    source: str
    checkpoint: str | None
    parameters: int | None  # None for an ONNX model: onnxruntime does not expose its weights
    labels: list[str] | None = None  # class names the model carries (Hugging Face id2label, an exported ONNX file)
    files_read: list[str] = field(default_factory=list)  # every file loading it read (harness/models/reads.py)
    weights: str | None = None  # the training checkpoint's entry loaded (state_dict_ema, ...); None for a bare one
    kind: ModelKind = DEFAULT_KIND  # set by load_model

    def describe(self, classes: int, transform: str) -> dict[str, object]:
        """The model as run.json records it."""
        return {
            "class": self.class_name,
            "source": self.source,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "parameters": self.parameters,
            "classes": classes,
            "transform": transform,
        }


def open_onnx(
    model: Path | bytes, want_cuda: bool, output_name: str | None = None, threads: int | None = None
) -> OnnxModule:
    """An ONNX file (or its bytes) as a module the pipeline calls (onnxruntime runs it; `threads`: see
    make_session)."""
    return OnnxModule(make_session(model, want_cuda, threads), output_name)


def load_onnx(config: Config) -> LoadedModel:
    path = kind_file(config, ONNX)
    want_cuda = config.device != "cpu" and config.gpus != 0 and torch.cuda.is_available()
    module = open_onnx(path, want_cuda, config.output_name)
    return LoadedModel(
        module=module,
        class_name=f"ONNX ({', '.join(module.providers)})",
        source=str(path),
        checkpoint=None,
        parameters=None,
        labels=read_labels(path),
    )


def load_saved(config: Config) -> LoadedModel:
    path = kind_file(config, SAVED)
    model, kind = load_saved_model(path, config.trust_pickle)
    with model_code("eval()"):
        model.eval()
    return LoadedModel(
        module=model,
        class_name=f"{kind} {type(model).__name__}",
        source=str(path),
        checkpoint=None,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def load_class(config: Config) -> LoadedModel:
    path = find_module_file(config)
    class_name = config.class_name or DEFAULT_CLASS
    model = create_model(path, class_name)
    checkpoint = resolve_checkpoint(config)
    weights = None
    if checkpoint is not None:
        weights = read_state_dict(checkpoint, config.ema)
        load_weights(model, weights.state, checkpoint)
    with model_code("eval()"):
        model.eval()
    return LoadedModel(
        module=model,
        class_name=class_name,
        source=str(path),
        checkpoint=str(checkpoint) if checkpoint else None,
        parameters=sum(p.numel() for p in model.parameters()),
        weights=weights.entry if weights is not None else None,
    )


def load_timm(config: Config) -> LoadedModel:
    model, description, checkpoint, weights = load_timm_model(config)
    return LoadedModel(
        module=model,
        class_name=description,
        source=config.model or "",
        checkpoint=str(checkpoint),
        parameters=sum(p.numel() for p in model.parameters()),
        weights=weights.entry,
    )


def load_hf(config: Config) -> LoadedModel:
    model, description, labels = load_hf_model(config.model_dir)
    weights = next((p for p in sorted(config.model_dir.glob("*.safetensors"))), None)
    return LoadedModel(
        module=model,
        class_name=description,
        source=str(config.model_dir / HF_CONFIG),
        checkpoint=str(weights) if weights else None,
        parameters=sum(p.numel() for p in model.parameters()),
        labels=labels,
    )


Loader = Callable[[Config], LoadedModel]
LOADERS: dict[ModelKind, Loader] = {  # every kind in models/kinds.py's KINDS, each once
    TIMM: load_timm,
    HF: load_hf,
    ONNX: load_onnx,
    SAVED: load_saved,
    CLASS: load_class,
}


def load_model(config: Config) -> LoadedModel:
    """The model the configuration names, loaded by its kind's loader, with every file loading it read."""
    kind = kind_of(config)
    with watch_reads() as files_read:
        loaded = LOADERS[kind](config)
    loaded.files_read = sorted(files_read)
    loaded.kind = kind
    return loaded
