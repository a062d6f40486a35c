"""Command line: the ObjectNet template's positional CLI, named options for every setting, and exit codes.

    harness [run] [IMAGES_DIR] [OUTPUT_FILE] [MODEL_CLASS_NAME] [MODEL_CHECKPOINT] [options]

Every named option is generated from a `Config` field, so --help, model/config.yaml and the environment always
name the same settings. `entrypoint.py`, `python -m harness` and the `harness` script all start in `entry`.

Nothing here imports torch: a run forks its head-start decoders first (harness/headstart.py), and each other
command imports its own module only when it is the one asked for, so `harness validate` never loads torch.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from harness import __version__
from harness.config import ENV_FIELDS, PREPROCESS_FIELDS, RUN_FIELDS, build_config
from harness.errors import EXIT_CODES, ConfigError, HarnessError
from harness.headstart import start_head
from harness.submission import open_submission
from harness.writer import partial_path

POSITIONALS = (  # the template's order
    ("input_dir", "IMAGES_DIR", "folder of images (default /input)"),
    ("output_file", "OUTPUT_FILE", "predictions CSV (default /output/predictions.csv)"),
    ("class_name", "MODEL_CLASS_NAME", "model class in the model folder's Python file"),
    ("checkpoint", "MODEL_CHECKPOINT", "state_dict file (path, or name in the model folder)"),
)
METAVARS = {"border": "N|auto", "mean": "M[,M,M]", "std": "S[,S,S]", "amp": "off|bf16|fp16", "label_map": "MAP"}
BOOL_FIELDS = {
    "softmax",
    "channels_last",
    "progress",
    "exif_transpose",
    "resume",
    "trust_pickle",
    "keep_freed_memory",
    "head_start",
    "compile",
    "jpeg_draft",
}


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))
    env = ", ".join(ENV_FIELDS)
    tools = [name for name in COMMANDS if name != "run"]
    return (
        "Settings come from, lowest to highest precedence: defaults < model/config.yaml < environment "
        f"({env}) < command line.\n\nother commands (harness COMMAND --help): {', '.join(tools)}"
        f"\n\nexit codes:\n{codes}"
    )


def _add_setting(group: argparse._ArgumentGroup, name: str, help_text: str) -> None:
    flags = [f"--{name.replace('_', '-')}"]
    if "_" in name:  # the template spelled its options with underscores (--batch_size)
        flags.append(f"--{name}")
    extra: dict[str, Any]
    if name in BOOL_FIELDS:
        extra = {"nargs": "?", "const": "true", "metavar": "true|false"}
    else:
        extra = {"metavar": METAVARS.get(name, name.upper())}
    group.add_argument(*flags, dest=name, default=None, help=help_text, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Classify every image in a folder and write the challenge's predictions CSV.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    for name, metavar, help_text in POSITIONALS:
        parser.add_argument(f"positional_{name}", nargs="?", metavar=metavar, help=help_text)
    run_group = parser.add_argument_group("run settings")
    for name, spec in RUN_FIELDS.items():
        _add_setting(run_group, name, spec.metadata["help"])
    run_group.add_argument(
        "--convert-outputs-mode",
        "--convert_outputs_mode",
        dest="convert_outputs_mode",
        choices=("0", "1"),
        help="the template's switch: 0 = the model's own ids (--label-map none), 1 = ObjectNet ids (auto)",
    )
    pre_group = parser.add_argument_group("preprocessing (usually set in model/config.yaml)")
    for name, spec in PREPROCESS_FIELDS.items():
        _add_setting(pre_group, name, spec.metadata["help"])
    return parser


def _merge(values: dict[str, Any]) -> dict[str, Any]:
    """Fold positionals and the template's switch into the named settings; a setting given twice must agree."""
    merged = {k: v for k, v in values.items() if not k.startswith("positional_") and k != "convert_outputs_mode"}
    aliases: list[tuple[str, Any]] = [(name, values[f"positional_{name}"]) for name, _, _ in POSITIONALS]
    mode = values.get("convert_outputs_mode")
    if mode is not None:
        aliases.append(("label_map", "none" if mode == "0" else "auto"))
    for name, value in aliases:
        if value is None:
            continue
        if merged.get(name) is not None and merged[name] != value:
            raise ConfigError(f"{name} given twice with different values: {merged[name]!r} and {value!r}")
        merged[name] = value
    return merged


class _Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop) handled like Ctrl-C, so the same clean-up runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def run_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    args = build_parser().parse_args(argv)
    config = build_config(open_submission(_merge(vars(args))), environ)
    head = start_head(config)
    try:
        # Imported only now: torch takes seconds to load, and the head start decodes meanwhile.
        if config.world_size > 1:
            from harness.distributed import run_sharded

            report = run_sharded(config)
        else:
            from harness.runner import run

            report = run(config, head)
    except KeyboardInterrupt as stop:
        reason = "terminated" if isinstance(stop, _Terminated) else "interrupted"
        print(
            f"harness: {reason}; the rows finished so far are in {partial_path(config.output_file)}",
            file=sys.stderr,
        )
        return 130
    finally:
        if head is not None:
            head.close()
    print(report.closing_line(config.output_file))
    return 0


Command = Callable[[Sequence[str], dict[str, str]], int]
COMMANDS: dict[str, str] = {  # name -> "module:function", imported when chosen
    "run": "harness.cli:run_command",
    "validate": "harness.validate:validate_command",
    "score": "harness.score:score_command",
    "check-model": "harness.inspect_model:check_model_command",
    "export-onnx": "harness.export_onnx:export_onnx_command",
    "ensemble": "harness.ensemble:ensemble_command",
}


def load_command(name: str) -> Command:
    module, function = COMMANDS[name].split(":")
    command: Command = getattr(importlib.import_module(module), function)
    return command


def exit_process(code: int) -> NoReturn:
    """End the process without Python's teardown, which takes 0.75 s once torch is loaded (measured on the
    2-core benchmark machine, each run): the atexit handlers still run (multiprocessing reaps its children, a
    submission's unpacked folder is removed) and the standard streams are flushed; every output file has already
    been committed and closed by then."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The process's start: entrypoint.py, `python -m harness` and the `harness` script."""
    exit_process(main())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return load_command(name)(argv, dict(os.environ))
    except HarnessError as error:
        print(f"harness: error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
