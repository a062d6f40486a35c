"""One exception type per kind of user mistake, each with its own exit code; and the few third-party errors the
harness can only recognise by their text, recognised here and nowhere else.

The CLI catches `HarnessError` and prints its message alone: these are mistakes a user can fix, so a traceback
would only hide the one line that says what to do (`--traceback` shows it, with the error that caused it). Each
class's docstring is its exit code's meaning in `--help` and the README: written once, here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class HarnessError(Exception):
    """A problem the user can fix, reported as one message and an exit code."""

    exit_code = 1


class ConfigError(HarnessError):
    """bad setting (command line, environment or `model/config.yaml`), or `--resume` of another run's partial file"""

    exit_code = 2


class InputError(HarnessError):
    """input folder missing, empty or unreadable, or a folder in it cannot be listed"""

    exit_code = 3


class ModelError(HarnessError):
    """model cannot be loaded, fails on a batch, or gives output of the wrong shape"""

    exit_code = 4


class DeviceError(HarnessError):
    """requested device, GPUs or confinement (`--confine on`) not available"""

    exit_code = 5


class OutputError(HarnessError):
    """output file or folder cannot be written"""

    exit_code = 6


class TooManyFailuresError(HarnessError):
    """more images failed than `--max-failures` allows (default 1%), or all did (the CSV is still written)"""

    exit_code = 7


class PipelineError(HarnessError):
    """a decoding process died or hung; finished rows are kept in the `.partial` file"""

    exit_code = 8


class CheckFailedError(HarnessError):
    """a check failed (the run's check of its CSV, `check`, `validate`, `check-model` limits, `export-onnx` parity)"""

    exit_code = 9


class ToolFileError(HarnessError):
    """a file handed to a tool cannot be read or is not what it reads (a CSV, answers, `--save-probs` files)"""

    exit_code = 10


ERROR_TYPES: tuple[type[HarnessError], ...] = (
    ConfigError,
    InputError,
    ModelError,
    DeviceError,
    OutputError,
    TooManyFailuresError,
    PipelineError,
    CheckFailedError,
    ToolFileError,
)
SUCCESS = 0
BUG = 1
INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    SUCCESS: "the CSV is right to submit: one valid row per image, failures within the limit",
    BUG: "internal error (a bug: please report it with the output of `--traceback`)",
    **{error.exit_code: (error.__doc__ or "").strip() for error in ERROR_TYPES},
    INTERRUPTED: "interrupted (SIGINT, or SIGTERM from `docker stop`); finished rows are in the `.partial` file",
}


def error_type(exit_code: int) -> type[HarnessError]:
    """The error class of an exit code, so an error passed on from another process (a torchrun rank) keeps its code."""
    return next((error for error in ERROR_TYPES if error.exit_code == exit_code), HarnessError)


def describe_user_error(error: BaseException) -> str:
    """An error raised by the user's code, in one line: `sys.exit(3)` in a model must not become exit code 3."""
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def model_code(what: str) -> Iterator[None]:
    """A call into the model's own code (its eval(), to(), hooks, forward): whatever it raises, SystemExit
    included, is the model's error (exit 4) in one line naming `what`, never a traceback or another exit code."""
    try:
        yield
    except HarnessError:
        raise
    except (Exception, SystemExit) as error:
        raise ModelError(f"the model's {what} failed: {describe_user_error(error)}") from error


# ---- third-party errors known only by their text; tests/test_errors.py provokes each one for real ----


def refused_pickle_globals(error: BaseException) -> list[str] | None:
    """The classes `torch.load(weights_only=True)` refused to unpickle, or None when `error` is not that refusal."""
    text = str(error)
    if "Unsupported global" not in text:
        return None
    return re.findall(r"GLOBAL ([\w.]+)", text)


def is_dataloader_failure(error: BaseException) -> bool:
    """PyTorch raises a DataLoader worker's death or time-out as a plain RuntimeError naming the DataLoader, in the
    main process, wherever it happens to be."""
    return isinstance(error, RuntimeError) and "DataLoader" in str(error)


def is_shared_memory_full(error: BaseException) -> bool:
    """A DataLoader worker that could not put its batch in shared memory: torch's "unable to write to file
    </torch_...>: No space left on device", or the bus error (SIGBUS) a full /dev/shm kills a writer with."""
    text = str(error)
    return ("No space left on device" in text and "torch_" in text) or "Bus error" in text or "SIGBUS" in text


def is_onnx_package_missing(error: BaseException) -> bool:
    """torch.onnx.export's complaint when the `onnx` package it writes through is not installed."""
    return "onnx is not installed" in str(error)


def is_remote_code_refusal(error: BaseException) -> bool:
    """transformers' refusal (trust_remote_code=False) of a folder whose config names its own Python code."""
    return "contains custom code which must be executed" in str(error)
