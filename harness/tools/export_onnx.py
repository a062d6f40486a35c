"""`harness export-onnx`: the model folder's model as ONNX, checked against PyTorch before anyone relies on it.

The export is harness/models/onnx_export.py's (PyTorch's TorchScript-based exporter, the batch axis dynamic).
Parity: the same preprocessed sample images go through PyTorch and onnxruntime (CPU), in batches of --batch-size
so the dynamic axis is exercised; the export fails unless every image gets the same top-1 class and the
probabilities differ by less than --tolerance. The file carries the run's preprocessing and label map in its
metadata, so `harness --model model.onnx` reproduces the PyTorch run with no config.yaml beside it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.config import Config
from harness.errors import (
    CheckFailedError,
    ConfigError,
    InputError,
    ModelError,
)
from harness.models.load import load_model, open_onnx
from harness.models.onnx_export import export
from harness.models.onnx_metadata import METADATA_KEY, settings_text
from harness.models.outputs import as_logits
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import DeviceNormalizer
from harness.pipeline.files import discover
from harness.pipeline.loader import ImageDataset
from harness.results.labels import read_labels_file
from harness.results.writer import write_atomic_bytes


@dataclass
class Parity:
    images: int
    max_prob_diff: float
    max_logit_diff: float
    top1_agree: int


def carried_settings(config: Config, labels: list[str] | None) -> dict[str, Any]:
    """What the ONNX file carries so that a run of the file alone reproduces this one: the preprocessing, the
    label map (a labels file's names themselves) and softmax."""
    settings: dict[str, Any] = {**config.to_dict()["preprocess"], "softmax": config.softmax}
    label_file = Path(config.label_map)
    if label_file.is_file():
        settings.update(label_map="auto", labels=read_labels_file(label_file))
    else:
        settings["label_map"] = config.label_map
        if labels:
            settings["labels"] = labels
    return settings


def store_settings(data: bytes, settings: dict[str, Any]) -> bytes:
    """The ONNX file with the settings in its metadata (read back by harness/models/onnx_metadata.py)."""
    try:
        import onnx
    except ImportError:
        raise ModelError(
            "export-onnx writes through the onnx package, which is not installed: pip install onnx"
        ) from None
    model = onnx.load_model_from_string(data)
    kept = {entry.key: entry.value for entry in model.metadata_props if entry.key != METADATA_KEY}
    onnx.helper.set_model_props(model, {**kept, METADATA_KEY: settings_text(settings)})
    return model.SerializeToString()


def sample_batch(config: Config, images_dir: Path, limit: int) -> torch.Tensor:
    """Up to `limit` images from `images_dir`, preprocessed exactly as a run would, as float32 on the CPU."""
    files = discover(images_dir)[:limit]
    if not files:
        raise InputError(f"no images in {images_dir} for the parity check")
    dataset = ImageDataset.of(files, Decoding.of(config))
    decoded = [image for _, image, error, _ in (dataset[i] for i in range(len(dataset))) if not error]
    if not decoded:
        raise InputError(
            f"none of the {len(files)} images in {images_dir} could be read: the parity check needs real images "
            "(pass --images DIR)"
        )
    batch = torch.stack(decoded)
    return DeviceNormalizer(config.preprocess, torch.device("cpu"), torch.float32, False)(batch)


def check_parity(model: nn.Module, onnx_model: nn.Module, images: torch.Tensor, batch_size: int) -> Parity:
    with torch.inference_mode():
        expected = torch.cat([as_logits(model(part), len(part)) for part in images.split(batch_size)]).float()
        got = torch.cat([onnx_model(part) for part in images.split(batch_size)]).float()
    return Parity(
        images=len(images),
        max_prob_diff=(expected.softmax(1) - got.softmax(1)).abs().max().item(),
        max_logit_diff=(expected - got).abs().max().item(),
        top1_agree=int((expected.argmax(1) == got.argmax(1)).sum()),
    )


def export_onnx(args: argparse.Namespace, config: Config) -> int:
    """export-onnx, in a confined process (harness/tools/commands.py read its command line): the file is written
    only once it matches the PyTorch model."""
    if config.transform_file.is_file():
        raise ModelError(
            f"{config.transform_file} is Python, which an ONNX file cannot carry: the .onnx would run with the "
            "harness's preprocessing instead, and give other answers. Write the preprocessing into config.yaml "
            "(harness check shows what the model receives), remove the transform, then export"
        )
    loaded = load_model(config)
    if not loaded.kind.torch_graph:
        raise ConfigError(
            f"{loaded.source} ({loaded.kind.name}) is not a PyTorch model: export-onnx exports a PyTorch model folder"
        )
    images = sample_batch(config, args.images, args.parity_images)
    size = config.preprocess.input_size
    blank = torch.zeros(1, 3, size, size)
    data = store_settings(export(loaded.module, blank, args.opset), carried_settings(config, loaded.labels))
    parity = check_parity(loaded.module, open_onnx(data, want_cuda=False), images, config.batch_size)
    matches = parity.top1_agree == parity.images and parity.max_prob_diff < args.tolerance
    if matches:
        write_atomic_bytes(args.output, data)
    print(
        f"harness: exported {loaded.class_name} (opset {args.opset}, dynamic batch, {size} x {size}); onnxruntime "
        f"vs PyTorch on {parity.images} images: top-1 agrees on {parity.top1_agree}, max |probability difference| "
        f"{parity.max_prob_diff:.2e}, max |logit difference| {parity.max_logit_diff:.2e}"
        + (f"; written to {args.output}" if matches else "")
    )
    if not matches:
        raise CheckFailedError(
            f"the export does not match the PyTorch model (tolerance {args.tolerance:g}): nothing written to "
            f"{args.output}"
        )
    return 0
