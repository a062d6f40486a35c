"""A Hugging Face image classifier from a local folder saved with `save_pretrained` (config.json, the weights,
preprocessor_config.json): loaded with local files only, so nothing is ever downloaded. Its image processor's
settings become the run's preprocessing (harness/models/preprocessing.py) and its `id2label` the class names."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from harness.errors import ModelError, describe_user_error, is_remote_code_refusal

GENERIC_LABEL = re.compile(r"LABEL_\d+")  # what transformers names classes nobody named


def load_hf_model(folder: Path) -> tuple[nn.Module, str, list[str] | None]:
    """(model in eval mode, its description, its class names or None when they are transformers' placeholders)."""
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "this is a Hugging Face model, and transformers is not installed: pip install -e '.[hf]'"
        ) from None
    if not folder.is_dir():
        raise ModelError(f"Hugging Face model folder {folder} does not exist")
    try:  # never the folder's own Python (auto_map): that would run a stranger's code, and ask on stdin first
        model = transformers.AutoModelForImageClassification.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as error:  # OSError for missing files, ValueError for an architecture it does not know, ...
        if is_remote_code_refusal(error):
            raise ModelError(
                f"{folder}/config.json names the model's own Python code (auto_map), and the harness runs no code "
                "from a model's files: save the model with one of transformers' own architectures, or export it to "
                "ONNX (harness export-onnx) and pass the .onnx file"
            ) from error
        raise ModelError(
            f"transformers cannot load {folder} as an image classifier: {describe_user_error(error)}"
        ) from error
    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    generic = not names or any(not name or GENERIC_LABEL.fullmatch(name) for name in names)
    return model.eval(), f"Hugging Face {type(model).__name__}", None if generic else names
