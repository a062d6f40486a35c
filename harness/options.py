"""From a command line to the one `Config`: the run's options (the template's positionals and one named option per
setting) and the model options the tools share. Everything goes through harness/sources.py, so the run, every tool,
scripts/bench.py and the tests read a command line the same way, with model/config.yaml and the environment
beneath it. Torch-free: the run parses its options before the head start forks.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from harness.config import PREPROCESS_FIELDS, RUN_FIELDS, Config, is_switch, setting_metavar
from harness.errors import ConfigError
from harness.models.preprocessing import carried_settings
from harness.models.submission import open_submission
from harness.sources import Sources, merge_sources

POSITIONALS = (  # the template's order
    ("input_dir", "IMAGES_DIR", "folder of images (default /input)"),
    ("output_file", "OUTPUT_FILE", "predictions CSV (default /output/predictions.csv)"),
    ("class_name", "MODEL_CLASS_NAME", "model class in the model folder's Python file"),
    ("checkpoint", "MODEL_CHECKPOINT", "state_dict file (path, or name in the model folder)"),
)
TEMPLATE_SWITCH = "convert_outputs_mode"  # the template's 0/1 for the label map
MODEL_OPTIONS = (
    "model",
    "model_dir",
    "module",
    "class_name",
    "checkpoint",
    "num_classes",
    "ema",
    "device",
    "batch_size",
    "input_size",
    "confine",
)


def _add_setting(group: argparse._ArgumentGroup, name: str, help_text: str) -> None:
    flags = [f"--{name.replace('_', '-')}"]
    if "_" in name:  # the template spelled its options with underscores (--batch_size)
        flags.append(f"--{name}")
    extra: dict[str, Any] = {"metavar": setting_metavar(name)}
    if is_switch(name):
        extra.update(nargs="?", const="true")
    group.add_argument(*flags, dest=name, default=None, help=help_text, **extra)


def run_parser(epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Classify every image in a folder and write the challenge's predictions CSV.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, metavar, help_text in POSITIONALS:
        parser.add_argument(f"positional_{name}", nargs="?", metavar=metavar, help=help_text)
    add_settings(parser)
    return parser


def add_settings(parser: argparse.ArgumentParser, leave_out: frozenset[str] = frozenset()) -> None:
    """One named option per setting, as `harness run` takes them (`harness check` runs with them too), except
    those in `leave_out`."""
    run_group = parser.add_argument_group("run settings")
    for name, spec in RUN_FIELDS.items():
        if name not in leave_out:
            _add_setting(run_group, name, spec.metadata["help"])
    run_group.add_argument(
        f"--{TEMPLATE_SWITCH.replace('_', '-')}",
        f"--{TEMPLATE_SWITCH}",
        dest=TEMPLATE_SWITCH,
        choices=("0", "1"),
        help="the template's switch: 0 = the model's own ids (--label-map none), 1 = ObjectNet ids (auto)",
    )
    pre_group = parser.add_argument_group("preprocessing (usually set in model/config.yaml)")
    for name, spec in PREPROCESS_FIELDS.items():
        _add_setting(pre_group, name, spec.metadata["help"])


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a parsed run command line gave, by name: positionals and the template's switch folded into the
    named settings (a setting given twice must agree), options not given left out."""
    values = vars(args)
    merged = {
        k: v for k, v in values.items() if not k.startswith("positional_") and k != TEMPLATE_SWITCH and v is not None
    }
    aliases: list[tuple[str, Any]] = [(name, values.get(f"positional_{name}")) for name, _, _ in POSITIONALS]
    mode = values.get(TEMPLATE_SWITCH)
    if mode is not None:
        aliases.append(("label_map", "none" if mode == "0" else "auto"))
    for name, value in aliases:
        if value is None:
            continue
        if merged.get(name) is not None and merged[name] != value:
            raise ConfigError(f"{name} given twice with different values: {merged[name]!r} and {value!r}")
        merged[name] = value
    return merged


def sources_from(given: Mapping[str, Any], environ: Mapping[str, str]) -> Sources:
    """The settings given by name with the sources beneath them merged, a zipped model folder unpacked: all a
    run reads before it confines itself (harness/pipeline/confine.py). Torch-free."""
    return merge_sources(open_submission(dict(given)), environ)


def with_model_settings(sources: Sources) -> Config:
    """The settings the model itself carries (timm's or Hugging Face's preprocessing, an exported ONNX file's)
    wherever no source set them; a timm model's needs torch, so a run reads them once confined."""
    return sources.with_model_settings(carried_settings)


def config_from(given: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """The whole Config for settings given by name (a tool or a test that confines nothing)."""
    return with_model_settings(sources_from(given, environ))


def run_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """`harness run`'s command line (also scripts/bench.py's harness options) as the run's Config."""
    return config_from(given_settings(run_parser().parse_args(argv)), environ)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model options of the tools (check-model, export-onnx): the run's own settings, meaning the same."""
    group = parser.add_argument_group("model (as for harness run)")
    for name in MODEL_OPTIONS:
        _add_setting(group, name, (RUN_FIELDS.get(name) or PREPROCESS_FIELDS[name]).metadata["help"])


def tool_sources(args: argparse.Namespace, environ: Mapping[str, str]) -> Sources:
    """A model tool's (check-model's, export-onnx's) settings, before the model's own."""
    return sources_from({name: getattr(args, name) for name in MODEL_OPTIONS}, environ)
