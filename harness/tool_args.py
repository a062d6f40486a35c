"""The model options the tool subcommands (check-model, export-onnx) share with a run.

They go through `build_config`, so the model folder's config.yaml, the environment and the command line mean
the same here as in `harness run`, and the model is measured at the input size it will really see.
"""

from __future__ import annotations

import argparse
from typing import Any

from harness.config import PREPROCESS_FIELDS, RUN_FIELDS, Config, build_config
from harness.submission import open_submission

MODEL_OPTIONS = ("model_dir", "module", "class_name", "checkpoint", "device", "batch_size", "input_size")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (as for harness run)")
    for name in MODEL_OPTIONS:
        spec = RUN_FIELDS.get(name) or PREPROCESS_FIELDS[name]
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=name.upper(), help=spec.metadata["help"])


def model_config(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    given: dict[str, Any] = {name: getattr(args, name) for name in MODEL_OPTIONS}
    return build_config(open_submission(given), environ)
