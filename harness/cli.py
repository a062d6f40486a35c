"""Command line: the ObjectNet template's positional CLI, named options for every setting, and exit codes.

    harness [run] [IMAGES_DIR] [OUTPUT_FILE] [MODEL_CLASS_NAME] [MODEL_CHECKPOINT] [options]

Every named option is generated from a `Config` field (harness/options.py), so --help, model/config.yaml and the
environment always name the same settings. `entrypoint.py`, `python -m harness` and the `harness` script all start
in `entry`.

Nothing here imports torch: a run chooses its files and forks its head-start decoders first
(harness/pipeline/headstart.py), and each other command imports its own module only when it is the one asked for,
so `harness validate` never loads torch.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from harness import __version__
from harness.config import ENV_FIELDS, Config
from harness.errors import BUG, EXIT_CODES, INTERRUPTED, HarnessError, ModelError, is_dataloader_failure
from harness.options import given_settings, run_parser, sources_from, with_model_settings
from harness.pipeline.confine import confined, denial, own_process, prepare_process
from harness.pipeline.export_cache import export_cache
from harness.pipeline.files import Discovery, run_files
from harness.pipeline.host import shorten_omp_spin
from harness.results.outputs import beside, part_output, run_outputs
from harness.results.writer import check_writable, output_folder_lock, partial_path

TRACEBACK_FLAG = "--traceback"


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))
    env = ", ".join(ENV_FIELDS)
    tools = [name for name in COMMANDS if name != "run"]
    return (
        "Settings come from, lowest to highest precedence: defaults < model/config.yaml < environment "
        f"({env}) < command line.\n\nother commands (harness COMMAND --help): {', '.join(tools)}"
        f"\n\n{TRACEBACK_FLAG} (any command): on an error, also print the traceback and the error that caused it"
        f"\n\nexit codes:\n{codes}"
    )


def build_parser() -> argparse.ArgumentParser:
    """`harness run`'s parser with the help's epilog: exit codes, the environment and the other commands."""
    parser = run_parser(_epilog())
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop) handled like Ctrl-C, so the same clean-up runs."""


class _Stops:
    """Whether a stop (Ctrl-C, SIGTERM) stops something: only while a command runs, and not while one of the
    harness's errors is on its way out. That error is the outcome, and its line must be the one told: a stop raised
    in its clean-up, or once main is telling it, would put "terminated" or a traceback in its place and cut that
    clean-up short (a torchrun rank whose peer died meets the agent's SIGTERM just then). The process is ending
    anyway, so such a stop is let be; so is one after the command has returned (its outputs are committed)."""

    running = False


def _stop(signum: int, frame: Any) -> None:
    if _Stops.running and not isinstance(sys.exc_info()[1], HarnessError):
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """Inside main's try, so a stop raised on the way in or out is still one of main's outcomes."""
    before, _Stops.running = _Stops.running, True
    try:
        yield
    finally:
        _Stops.running = before


def run_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    given = given_settings(build_parser().parse_args(argv))
    prepare_process()
    sources = sources_from(given, environ)
    config = sources.config
    shorten_omp_spin(config.omp_spin_count, environ)  # read as torch loads, below
    # One run per output folder; torchrun's other ranks write inside rank 0's.
    lock = contextlib.nullcontext() if config.rank else output_folder_lock(writable_folder(config))
    with lock:
        found = run_files(config.input_dir, config.skip_unreadable_folders)  # chosen once, for every step after
        outputs = run_outputs(config)
        with confined(config, environ, outputs, found.linked, export_cache(config, environ, outputs.files)):
            return _classify(with_model_settings(sources), found)


def _classify(config: Config, found: Discovery) -> int:
    """The confined part of a run: its decoders, torch, the model, the rows."""
    from harness.pipeline.decode_options import Decoding
    from harness.pipeline.headstart import start_head

    decoding = Decoding.of(config)  # once, for the head start's decoders and the DataLoader's workers alike
    head = start_head(config, found.files, decoding)
    try:
        try:
            # Imported only now: torch takes seconds to load, and the head start decodes meanwhile.
            if config.world_size > 1:
                from harness.pipeline.distributed import run_sharded

                report = run_sharded(config, found, decoding)
            else:
                from harness.pipeline.runner import finish, prepare

                keys = [image.key for image in found.files]
                report = finish(config, prepare(config, found, decoding, head).classify(), keys)
        except KeyboardInterrupt as stop:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the decoders were stopped too: no word of theirs now
            return _stopped(stop, config)
        finally:
            if head is not None:
                head.close()
    except RuntimeError as error:  # a decoder stopped with the run, said by torch before the line above took over
        if not isinstance(error.__context__, KeyboardInterrupt) or not is_dataloader_failure(error):
            raise
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        return _stopped(error.__context__, config)
    if config.rank == 0:  # under torchrun, rank 0's line covers the merged run
        print(report.closing_line())
    return 0


def _stopped(stop: KeyboardInterrupt, config: Config) -> int:
    """One line for a run stopped by Ctrl-C or SIGTERM: what it kept, and how to go on."""
    reason = "terminated" if isinstance(stop, _Terminated) else "interrupted"
    partial = partial_path(
        config.output_file if config.world_size == 1 else part_output(config.output_file, config.rank)
    )
    kept = (
        f"the rows finished so far are in {partial}: the same command with --resume goes on from there"
        if partial.exists()
        else "no row was finished, so there is nothing to resume"
    )
    ranks = " (under torchrun, every rank stops when one fails: its harness: error: line says why)"
    print(f"harness: {reason}{ranks if config.world_size > 1 else ''}; {kept}", file=sys.stderr)
    return INTERRUPTED


def writable_folder(config: Config) -> Path:
    """The output folder, checked before any work: it can take the predictions and the files beside them, and
    --save-probs's folder its .npz."""
    check_writable(config.output_file, *beside(config.output_file)[1:])  # errors.csv, run.json, the records
    if config.save_probs is not None:
        check_writable(config.save_probs, suffix=".npz", what="--save-probs writes a .npz file")
    return config.output_file.parent


Command = Callable[[Sequence[str], dict[str, str]], int]
COMMANDS: dict[str, str] = {  # name -> "module:function", imported when chosen
    "run": "harness.cli:run_command",
    "validate": "harness.tools.validate:validate_command",
    "score": "harness.tools.score:score_command",
    "check": "harness.tools.commands:check_command",
    "check-model": "harness.tools.commands:check_model_command",
    "export-onnx": "harness.tools.commands:export_onnx_command",
    "ensemble": "harness.tools.ensemble:ensemble_command",
}


def load_command(name: str) -> Command:
    module, function = COMMANDS[name].split(":")
    command: Command = getattr(importlib.import_module(module), function)
    return command


def exit_process(code: int) -> NoReturn:
    """End the process without Python's teardown, which takes most of a second once torch is loaded
    (docs/speed.md), on every run: the atexit handlers still run (multiprocessing reaps its children, a
    submission's unpacked folder is removed) and the standard streams are flushed; every output file has already
    been committed and closed by then."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The process's start: entrypoint.py, `python -m harness` and the `harness` script. This process is the
    harness's own: it confines itself (harness/pipeline/confine.py)."""
    own_process()
    exit_process(main())


def print_traceback(error: BaseException) -> None:
    """The error's traceback and every error before it in the chain, including causes hidden by `from None`."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in reversed(chain):
        traceback.print_exception(type(link), link, link.__traceback__, chain=False, file=sys.stderr)
        if link is not chain[0]:
            print("\nwhich caused:\n", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = TRACEBACK_FLAG in argv
    argv = [arg for arg in argv if arg != TRACEBACK_FLAG]
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    stops = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored (`command &`)
        stops.append(signal.SIGINT)
    previous = {stop: signal.signal(stop, _stop) for stop in stops}
    try:
        with _stoppable():
            return load_command(name)(argv, dict(os.environ))
    except HarnessError as error:
        if show_traceback:
            print_traceback(error)
        refused = denial(error) if isinstance(error, ModelError) else None
        print(f"harness: error: {refused or error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # a bug, unless the confinement refused the harness's own code something
        refused = denial(error, who="the harness")
        if refused is None:
            raise
        if show_traceback:
            print_traceback(error)
        print(f"harness: error: {refused} (a gap in the confinement: please report it)", file=sys.stderr)
        return BUG
    except KeyboardInterrupt as stop:  # a tool stopped by Ctrl-C or docker stop (a run says what it kept itself)
        print(f"harness: {'terminated' if isinstance(stop, _Terminated) else 'interrupted'}", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as stop:  # argparse's refusal of an option (2), or --help (0): the same codes, returned
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        raise
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
