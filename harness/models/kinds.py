"""Every kind of model the harness runs, in one registry: how each is recognised and what the harness may do to it.
Adding a kind is one entry here, its loader in models/load.py's LOADERS (and, when the model carries settings, a
reader in models/preprocessing.py's SETTINGS_READERS), and a row in the README's model-sources table; the
architecture test holds the three together.

Torch-free and below the loaders: the settings locate a model before anything heavy loads, and the run reads a
model's own settings before its head-start decoders fork, which must happen before torch loads wherever it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import Config
from harness.errors import ModelError

MODULE_FILES = ("model.py", "model_description.py")  # ours / the AISafety contract, then the ObjectNet template's


@dataclass(frozen=True)
class ModelKind:
    name: str
    prefix: str | None = None  # `--model PREFIX...` names this kind
    suffixes: tuple[str, ...] = ()  # a file with one of these, named or the folder's only one, is this kind
    marker: str | None = None  # a file that makes a folder with no Python model file this kind
    torch_graph: bool = True  # PyTorch layers the harness sees: folding, the layout trial, --compile, check-model
    # and export-onnx apply; False for a model another runtime runs (ONNX)
    framework: str = ""  # the framework's own pipeline `harness check --parity` compares with (harness/tools/parity.py)


TIMM = ModelKind("timm", prefix="timm:", framework="timm's own pipeline")
HF = ModelKind("hf", prefix="hf:", marker="config.json", framework="transformers' image processor and model")
ONNX = ModelKind("onnx", suffixes=(".onnx",), torch_graph=False)
SAVED = ModelKind("saved", suffixes=(".pt", ".pth", ".ts", ".torchscript"))
CLASS = ModelKind("class")  # a folder that is none of the others: its Python model file says what it is
KINDS = (TIMM, HF, ONNX, SAVED, CLASS)  # recognised in this order
DEFAULT_KIND = CLASS
MODEL_PREFIXES = tuple(kind.prefix for kind in KINDS if kind.prefix)
SAVED_SUFFIXES = tuple(suffix for kind in KINDS for suffix in kind.suffixes)


def kind_of(config: Config) -> ModelKind:
    """The kind a configuration names: a prefix first, then a saved file, then a folder's marker file."""
    model = config.model or ""
    for kind in KINDS:
        if kind.prefix and model.startswith(kind.prefix):
            return kind
    for kind in KINDS:
        if kind.suffixes and find_saved_file(config, kind.suffixes) is not None:
            return kind
    folder = config.model_dir
    if not config.module and not has_module_file(folder):
        for kind in KINDS:
            if kind.marker and (folder / kind.marker).is_file():
                return kind
    return DEFAULT_KIND


def has_module_file(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODULE_FILES)


def find_saved_file(config: Config, suffixes: tuple[str, ...]) -> Path | None:
    """A saved model's file: named by `module`, or the folder's only file with one of `suffixes` when the folder
    holds no Python model file."""
    folder = config.model_dir
    if config.module:
        return folder / config.module if config.module.lower().endswith(suffixes) else None
    if not folder.is_dir() or has_module_file(folder):
        return None
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if len(found) > 1:
        raise ModelError(f"model folder {folder} holds {len(found)} {'/'.join(suffixes)} files: name one with --module")
    return found[0] if found else None


def kind_file(config: Config, kind: ModelKind) -> Path:
    """The file a saved kind loads from; a named file that is not there is the user's to fix."""
    path = find_saved_file(config, kind.suffixes) or config.model_dir
    if not path.is_file():
        raise ModelError(f"{path} does not exist (set by 'module')")
    return path


def locate_model(model: str | None, model_dir: str | None) -> tuple[dict[str, Any], bool]:
    """Where `--model` (or `--model-dir`) points, as the settings it implies, and whether that folder's config.yaml
    applies: a folder is the model folder; a saved model's file is that file in its folder; `hf:FOLDER` is a
    Hugging Face folder; `timm:NAME` needs no folder (its config.yaml is read only with --model-dir)."""
    spec = model or model_dir
    if spec is None:
        return {}, True
    text = str(spec).strip()
    if TIMM.prefix and text.startswith(TIMM.prefix):
        return ({"model_dir": model_dir} if model_dir else {}), model_dir is not None
    if HF.prefix and text.startswith(HF.prefix):
        return {"model_dir": text[len(HF.prefix) :]}, True
    path = Path(text)
    if path.is_file() and path.suffix.lower() in SAVED_SUFFIXES:
        return {"model_dir": str(path.parent), "module": path.name}, True
    if path.is_file():
        raise ModelError(
            f"model {path} is a file the harness does not run directly: pass its folder, a .zip, a "
            f"{'/'.join(SAVED_SUFFIXES)} file, timm:NAME or hf:FOLDER"
        )
    if model is not None and not path.exists():
        raise ModelError(
            f"model {path} does not exist: pass a model folder, a .zip, a model file, timm:NAME or hf:FOLDER"
        )
    return {"model_dir": text}, True
