"""One exception type per kind of user mistake, each with its own exit code.

The CLI catches `HarnessError` and prints its message alone: these are mistakes a user can fix, so a traceback
would only hide the one line that says what to do.
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base class: a problem the user can fix, reported as one message and an exit code."""

    exit_code = 1


class ConfigError(HarnessError):
    """A setting is unknown or has a value the harness cannot use."""

    exit_code = 2


class InputError(HarnessError):
    """The input folder is missing, empty or unreadable."""

    exit_code = 3


class ModelError(HarnessError):
    """The model folder, class or checkpoint cannot be loaded, or the model's output has the wrong shape."""

    exit_code = 4


class DeviceError(HarnessError):
    """The requested device or number of GPUs is not available."""

    exit_code = 5


class OutputError(HarnessError):
    """The predictions file or its folder cannot be written."""

    exit_code = 6


class TooManyFailuresError(HarnessError):
    """More images failed to decode than the run allows."""

    exit_code = 7


class PipelineError(HarnessError):
    """A decoding worker died or stopped answering (killed for memory, or stuck in native code)."""

    exit_code = 8


class CheckFailedError(HarnessError):
    """A tool's check failed: an invalid predictions file, a broken model limit, an ONNX parity mismatch."""

    exit_code = 9


EXIT_CODES: dict[int, str] = {
    0: "success: every image has a row",
    1: "internal error (a bug: please report it with the traceback)",
    ConfigError.exit_code: "bad setting (command line, environment or model/config.yaml)",
    InputError.exit_code: "input folder missing, empty or unreadable",
    ModelError.exit_code: "model cannot be loaded or gives output of the wrong shape",
    DeviceError.exit_code: "requested device or GPUs not available",
    OutputError.exit_code: "output file or folder cannot be written",
    TooManyFailuresError.exit_code: "more images failed than --max-failures allows",
    PipelineError.exit_code: "a decoding worker died or hung; finished rows are kept in the .partial file",
    CheckFailedError.exit_code: "a tool's check failed (validate, check-model limits, export-onnx parity)",
    130: "interrupted (SIGINT/SIGTERM); finished rows are kept in the .partial file",
}
