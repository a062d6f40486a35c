"""A PyTorch model as ONNX: the one exporter `harness export-onnx` writes files with and the run's onnxruntime
engine (harness/pipeline/engine.py) runs, and the proof the run asks first that the export is the whole model.

The bytes come from PyTorch's TorchScript-based exporter (`torch.onnx.export(dynamo=False)`), which needs only the
`onnx` package (the newer dynamo exporter also needs `onnxscript`). It records the one path the example input
takes, so a model whose forward branches on its input's values would be exported with that branch alone: before a
run relies on an export, `torch.export` must capture the whole model with the batch size free
(`capture_failure`), which it refuses for data-dependent control flow and for code that fixes the batch size.

A run makes the two in a forked child process that exits after (`proven_export`): their imports and memory
(torch.export's and the exporter's machinery, about 230 MB for EfficientNet-Lite0) never enter the run's process,
which the decoding workers fork from.
"""

from __future__ import annotations

import io
import os
import signal
import warnings

import torch
from torch import nn

from harness.errors import ModelError, describe_user_error, is_onnx_package_missing
from harness.models.outputs import as_logits

INPUT_NAME, OUTPUT_NAME = "images", "logits"


class Logits(nn.Module):
    """The model with its output reduced to the N x C tensor the harness reads (tuple, dict, .logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return as_logits(self.model(images), images.shape[0])


def export(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """The model as an ONNX file's bytes, its batch axis dynamic, traced on `example` (N x 3 x H x W model
    inputs); an output a run would refuse is refused before the export."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    example = example.contiguous()
    try:
        with torch.inference_mode():
            as_logits(model(example), len(example))
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(
            f"the model failed on its example input before export: {describe_user_error(error)}"
        ) from error
    written = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                Logits(model).eval(),
                (example,),
                written,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=opset,
            )
    except Exception as error:
        hint = " (pip install onnx)" if is_onnx_package_missing(error) else ""
        raise ModelError(f"ONNX export failed{hint}: {type(error).__name__}: {error}") from error
    return written.getvalue()


def capture_failure(model: nn.Module, example: torch.Tensor) -> str | None:
    """None where `torch.export` captures the whole model in one graph with the batch size free (more than one
    image in `example`); else why not, in one line."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.export.export(
                Logits(model).eval(), (example.contiguous(),), dynamic_shapes=({0: batch},), strict=False
            )
    except (Exception, SystemExit) as error:  # data-dependent control flow, a fixed batch, code it cannot follow
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        return f"torch.export cannot capture the whole model ({type(error).__name__}: {first})"
    return None


class NotExported(Exception):
    """Why a model was not exported, in one line."""


def proven_export(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """`export`'s bytes where `capture_failure` finds none, both made in a forked child process (this module's
    docstring); NotExported with why not, whatever ended the child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _export_in_child(model, example, opset, write)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if payload[:1] == b"o":
        return payload[1:]
    if payload[:1] == b"e":
        raise NotExported(payload[1:].decode("utf-8", "replace"))
    code = os.waitstatus_to_exitcode(status)
    ended = f"signal {-code}" if code < 0 else f"exit code {code}"
    raise NotExported(f"the export's process ended without an answer ({ended})")


def _export_in_child(model: nn.Module, example: torch.Tensor, opset: int, write: int) -> None:
    """The child's whole life: the proof, the export, the answer on `write` ("o" and the bytes, or "e" and why),
    then an exit that runs none of the parent's exit handlers."""
    try:
        torch.set_num_threads(1)  # the parent's OpenMP threads do not come through a fork
        why = capture_failure(model, example)
        payload = b"e" + why.encode() if why else b"o" + export(model, example, opset)
    except BaseException as error:  # the model's code, the exporter's: the parent runs PyTorch then
        payload = b"e" + f"the export failed ({describe_user_error(error)})".encode()
    try:
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
    finally:
        os._exit(0)
