"""ONNX models through onnxruntime, behind the same `nn.Module` call as a PyTorch model.

The pipeline's preprocessing, label maps and writer then apply unchanged. onnxruntime picks its providers
silently: a CUDA provider that fails to load (no cuDNN, a CUDA version mismatch) leaves the session on the CPU
with no error, so after creating the session we compare the providers really active with the ones asked for.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from harness.console import say
from harness.errors import ModelError

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def _onnxruntime() -> ModuleType:
    """Imported late: only ONNX models need it."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            "this model is ONNX, and no ONNX runtime is installed: pip install onnxruntime (CPU) or onnxruntime-gpu "
            "(CUDA), one of them, not both (pip install -e '.[onnx]' or '.[onnx-gpu]')"
        ) from None
    return onnxruntime


def make_session(model: Path | bytes, want_cuda: bool, threads: int | None = None) -> Any:
    """A session on CUDA when asked for and possible, else the CPU; a silent CPU fallback is warned about. `model`
    is the file, or its bytes (an export being checked before it is written). With `threads` (the run's engine,
    beside its decoders) the CPU work takes that many threads, which sleep when idle rather than spin: a spinning
    thread holds its core from the idle-priority decoders, as libgomp's did (docs/speed.md)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    providers = [CUDA_PROVIDER, CPU_PROVIDER] if want_cuda and CUDA_PROVIDER in available else [CPU_PROVIDER]
    if want_cuda and CUDA_PROVIDER not in available:
        say(
            "WARNING: a GPU is visible but this onnxruntime has no CUDA provider: the ONNX model runs on the CPU. "
            "To use the GPU, replace it with onnxruntime-gpu: pip uninstall onnxruntime && pip install onnxruntime-gpu"
        )
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as error:  # onnxruntime's own exception types differ between versions
        shown = "the exported model" if isinstance(model, bytes) else model
        raise ModelError(f"onnxruntime cannot load {shown}: {error}") from error
    if want_cuda and CUDA_PROVIDER in available and session.get_providers()[0] != CUDA_PROVIDER:
        say(
            f"WARNING: onnxruntime could not start its CUDA provider (active: {', '.join(session.get_providers())}): "
            "the ONNX model runs on the CPU. Check that the CUDA and cuDNN versions match onnxruntime-gpu."
        )
    return session


class OnnxModule(nn.Module):
    """One float32 N x 3 x H x W input, and the one output that holds the scores (`output_name` where the model
    has several: the harness never guesses), returned as a tensor on the input's device."""

    def __init__(self, session: Any, output_name: str | None = None) -> None:
        super().__init__()
        self.session = session
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelError(f"the ONNX model takes {len(inputs)} inputs ({names}); the harness feeds one image batch")
        self.input_name = inputs[0].name
        outputs = [output.name for output in session.get_outputs()]
        if output_name is not None and output_name not in outputs:
            raise ModelError(f"the ONNX model has no output {output_name!r}; its outputs: {', '.join(outputs)}")
        if output_name is None and len(outputs) != 1:
            raise ModelError(
                f"the ONNX model has {len(outputs)} outputs ({', '.join(outputs)}): name the one that holds the "
                "scores with --output-name"
            )
        self.output_name = output_name or outputs[0]
        self.providers = session.get_providers()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.session.run([self.output_name], {self.input_name: _array(images)})[0]
        return torch.from_numpy(output).to(images.device)

    def release_memory(self, images: torch.Tensor) -> None:
        """Run `images` once more, the memory arena's free blocks handed back after: passes on more images sized
        it, and the decoding workers forked next would each count it again (docs/benchmarks.md)."""
        options = _onnxruntime().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.session.run([self.output_name], {self.input_name: _array(images)}, options)


def _array(images: torch.Tensor) -> Any:
    return images.detach().float().contiguous().cpu().numpy()
