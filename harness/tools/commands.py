"""The command lines of the tools that run a model (check, check-model, export-onnx), read torch-free: each tool
reads its options and settings, confines the process as a run does (harness/pipeline/confine.py), and only then
imports its own module, which loads torch and the model.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from harness.config import SETTINGS, Config
from harness.errors import ConfigError
from harness.models.kinds import kind_of
from harness.options import (
    add_model_options,
    add_settings,
    given_settings,
    sources_from,
    tool_sources,
    with_model_settings,
)
from harness.pipeline.confine import confined, prepare_process
from harness.results.gate import OutputFiles
from harness.results.outputs import beside
from harness.results.writer import check_writable, output_folder_lock
from harness.tools.arguments import PHOTO_ANSWERS, PHOTOS, positive_number

ESTIMATE = 50_000  # images, about ObjectNet's test set
PREVIEW = ("preview.png", "preview.html")  # what check draws, beside its run's CSV
# Run settings a check sets itself: where it reads and writes, and what only a long run needs.
LEFT_OUT = frozenset(
    {"input_dir", "output_file", "resume", "save_probs", "progress", "head_start"}
    | {"world_size", "rank", "local_rank", "local_world_size"}
)
MIN_OPSET, MAX_OPSET = 7, 23  # what torch.onnx.export writes


def add_measure_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The timing and the limits, as check-model and check both take them."""
    parser.add_argument("--repeats", type=int, default=3, help="timed batches (default 3; the median is shown)")
    parser.add_argument("--max-params", type=positive_number, help="fail above this many parameters (e.g. 30e6)")
    parser.add_argument(
        "--max-gflops", type=positive_number, help="fail above this many GFLOPs per image (2 per multiply-add)"
    )
    parser.add_argument("--max-gmacs", type=positive_number, help="fail above this many GMACs per image")


@contextlib.contextmanager
def shipped_photos() -> Iterator[Path]:
    with resources.as_file(resources.files("harness.data").joinpath(PHOTOS)) as folder:
        yield folder


def check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness check",
        description="Look before you submit: run the model as harness run would on labelled images, audit the "
        "usual preprocessing mistakes, and draw what the model receives.",
        epilog="Every run setting can be given as for harness run (model/config.yaml < environment < options).",
    )
    check = parser.add_argument_group("check")
    check.add_argument(
        "--images", type=Path, metavar="DIR", help="your images (default: the photos shipped with the harness)"
    )
    check.add_argument(
        "--answers", type=Path, metavar="FILE", help="answers for --images: ObjectNet answers JSON, or CSV key,label"
    )
    check.add_argument(
        "--output", type=Path, default=Path("check"), metavar="DIR", help="folder for the preview and the run's CSV"
    )
    check.add_argument(
        "--estimate", type=int, default=ESTIMATE, metavar="N", help=f"images to estimate the time of ({ESTIMATE:,})"
    )
    check.add_argument(
        "--parity",
        action="store_true",
        help="also run a timm or Hugging Face model through its own framework's pipeline and compare, image by image",
    )
    add_measure_options(check)
    add_settings(parser, LEFT_OUT)
    return parser


def check_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    args = check_parser().parse_args(argv)
    if args.answers is not None and args.images is None:
        raise ConfigError("--answers needs --images: the answers are for your images")
    if args.estimate < 1:
        raise ConfigError(f"--estimate {args.estimate}: give a number of images, at least 1")
    settings = {name: value for name, value in given_settings(args).items() if name in SETTINGS}
    prepare_process()
    with shipped_photos() as photos:
        output = args.output / "predictions.csv"
        given = {**settings, "input_dir": args.images or photos, "output_file": output, "progress": False}
        sources = sources_from(given, environ)
        config = sources.config
        parity = parity_kind(config) if args.parity else None
        preview = [args.output / name for name in PREVIEW]
        check_writable(config.output_file, *beside(output)[1:], *preview)
        outputs = OutputFiles.of([*beside(output), *preview])
        answers = args.answers or (None if args.images else photos / PHOTO_ANSWERS)
        reads = [photos, *([answers] if answers else [])]  # the check's own answers, read once confined
        with output_folder_lock(args.output), confined(config, environ, outputs, reads):
            from harness.tools.check import check

            return check(args, with_model_settings(sources), answers, parity, preview)


def parity_kind(config: Config) -> str:
    """The model's kind, when `check --parity` can compare it with its framework's own pipeline; otherwise exit 2
    before any work."""
    kind = kind_of(config)
    if not kind.framework:
        raise ConfigError(f"--parity needs a timm (timm:NAME) or Hugging Face model; this is a {kind.name} model")
    return kind.name


def check_model_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(
        prog="harness check-model", description="The model's size, cost and speed, against limits if given."
    )
    add_model_options(parser)
    add_measure_options(parser)
    args = parser.parse_args(argv)
    prepare_process()
    sources = tool_sources(args, environ)
    with confined(sources.config, environ, OutputFiles()):
        from harness.tools.check_model import check_model

        return check_model(args, with_model_settings(sources))


def export_onnx_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(
        prog="harness export-onnx",
        description="The model folder's model as ONNX, checked against PyTorch before anyone relies on it.",
    )
    add_model_options(parser)
    parser.add_argument("--output", type=Path, default=Path("model.onnx"), help="ONNX file to write (model.onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--images", type=Path, default=Path("sample-images"), help="images for the parity check")
    parser.add_argument("--parity-images", type=int, default=64, help="at most this many images are compared")
    parser.add_argument(
        "--tolerance", type=positive_number, default=1e-4, help="largest probability difference allowed"
    )
    args = parser.parse_args(argv)
    if args.parity_images < 1:
        raise ConfigError(f"--parity-images {args.parity_images}: give a number of images, at least 1")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise ConfigError(f"--opset {args.opset}: give an ONNX opset from {MIN_OPSET} to {MAX_OPSET}")
    prepare_process()
    sources = tool_sources(args, environ)
    check_writable(args.output, suffix=".onnx", what="export-onnx writes an ONNX file")
    with confined(sources.config, environ, OutputFiles.of([args.output]), [args.images]):
        from harness.tools.export_onnx import export_onnx

        return export_onnx(args, with_model_settings(sources))
