"""Choosing where the model runs and preparing it there once: device, GPUs, threads, precision, memory format,
and the input values (uint8 batches become the model's floats on the device)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.config import Config, Preprocess
from harness.errors import ConfigError, DeviceError, model_code
from harness.models.fold import FoldResult, fold_batchnorm
from harness.models.outputs import as_logits
from harness.pipeline.host import keep_freed_memory, usable_cpus

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    gpu_ids: list[int] = field(default_factory=list)
    amp: str | None = None
    channels_last: bool = False  # the layout the model runs in; `auto` starts False (harness/pipeline/layout.py)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the normaliser produces: the AMP dtype on CUDA (autocast would cast the first layer's
        input anyway), float32 on the CPU where autocast decides per op."""
        if self.amp and self.device.type == "cuda":
            return AMP_DTYPES[self.amp]
        return torch.float32

    def normalizer(self, pre: Preprocess) -> DeviceNormalizer:
        """The model's input made on this plan's device, in its input dtype and memory layout."""
        return DeviceNormalizer(pre, self.device, self.input_dtype, self.channels_last)

    def describe(self) -> dict[str, object]:
        names = [torch.cuda.get_device_name(i) for i in self.gpu_ids] if self.device.type == "cuda" else []
        return {
            "device": str(self.device),
            "gpus": self.gpu_ids,
            "gpu_names": names,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "torch": torch.__version__,
            "cuda": torch.version.cuda if self.device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(),
        }


def tune_process(config: Config) -> dict[str, object]:
    """Apply the run's process-wide speed settings once, before the model loads and the workers fork (they inherit
    the malloc settings; harness/pipeline/host.py says why they pay); returns what was applied, for run.json."""
    kept = keep_freed_memory() if config.keep_freed_memory else False
    # torch counts the host's cores; a container's CPU quota (docker --cpus) or affinity may allow far fewer.
    # Only ever lowered by default, so torchrun's one thread per process stays.
    torch.set_num_threads(config.threads if config.threads is not None else min(torch.get_num_threads(), usable_cpus()))
    return {"keep_freed_memory": kept, "torch_threads": torch.get_num_threads()}


def plan_devices(config: Config) -> DevicePlan:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wants_cuda = config.device == "cuda" or (config.device == "auto" and available > 0 and config.gpus != 0)
    if not wants_cuda:
        if config.gpus:
            raise DeviceError(f"--gpus {config.gpus} asked for, but no CUDA GPU is visible (found 0)")
        if config.amp == "fp16":
            raise ConfigError(
                "--amp fp16 needs a CUDA GPU and this run is on the CPU: use --amp bf16, or leave AMP off"
            )
        return DevicePlan(torch.device("cpu"), [], config.amp, config.channels_last is True)
    if available == 0:
        raise DeviceError("--device cuda asked for, but no CUDA GPU is visible: use --device auto or cpu")
    if config.world_size > 1:  # torchrun: one process per GPU
        return DevicePlan(
            torch.device("cuda", config.local_rank), [config.local_rank], config.amp, config.channels_last is True
        )
    count = available if config.gpus is None else config.gpus
    if count == 0:
        raise DeviceError("--device cuda with --gpus 0: ask for at least one GPU, or use --device cpu")
    if count > available:
        raise DeviceError(f"--gpus {count} asked for, but only {available} CUDA GPU(s) are visible")
    return DevicePlan(torch.device("cuda", 0), list(range(count)), config.amp, config.channels_last is True)


def on_device(model: nn.Module, plan: DevicePlan) -> nn.Module:
    """The model on the plan's device, in its layout: moved once (a second call finds it there and moves nothing)."""
    memory_format = torch.channels_last if plan.channels_last else torch.preserve_format
    with model_code(f"to({plan.device})"):
        return model.to(device=plan.device, memory_format=memory_format)


def prepare_model(
    model: nn.Module, plan: DevicePlan, fold_sample: torch.Tensor | None = None
) -> tuple[nn.Module, FoldResult]:
    """Move the model once, fold its BatchNorms where `fold_sample` (model inputs on the device) is given to check
    the folds on (harness/models/fold.py), and wrap it in DataParallel once, outside the batch loop."""
    model = on_device(model, plan)
    if plan.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    folded = FoldResult(0, "off: fold_batchnorm false")
    if fold_sample is not None:
        folded = fold_batchnorm(model, fold_sample, lambda output: as_logits(output, len(fold_sample)))
    if len(plan.gpu_ids) > 1:
        model = nn.DataParallel(model, device_ids=plan.gpu_ids)
    return model, folded


def seeded_images(blank: torch.Tensor, count: int) -> torch.Tensor:
    """`count` random images (seeded, so every run checks alike) shaped and typed as the decoders make `blank`:
    uint8 pixels, or a model folder's own transform's floats."""
    seeded = torch.Generator().manual_seed(0)
    shape = (count, *blank.shape)
    if blank.dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=seeded)
    return torch.rand(shape, generator=seeded).to(blank.dtype)


def fold_sample(config: Config, plan: DevicePlan, sample: torch.Tensor) -> torch.Tensor | None:
    """The check images (harness/pipeline/loader.py: check_sample) as the model receives them, to check the
    BatchNorm folds on; None where fold_batchnorm is off. float32 whatever the AMP: the folds are checked without
    autocast, in the weights' own precision."""
    if not config.fold_batchnorm:
        return None
    normalize = DeviceNormalizer(config.preprocess, plan.device, torch.float32, plan.channels_last)
    return normalize(sample.to(plan.device))


@contextlib.contextmanager
def inference_context(plan: DevicePlan) -> Iterator[None]:
    with torch.inference_mode():
        if plan.amp:
            with torch.autocast(device_type=plan.device.type, dtype=AMP_DTYPES[plan.amp]):
                yield
        else:
            yield


class DeviceNormalizer:
    """uint8 N x 3 x H x W on the device -> the model's input: channel order, scale, mean and std in one affine.

    (x / d - mean) / std == x * (1 / (d * std)) + (-mean / std), with d = 255 for values 0..1 and 1 for 0..255.
    """

    def __init__(self, pre: Preprocess, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        divisor = 255.0 if pre.value_scale == 1.0 else 1.0
        mean = pre.mean or (0.0, 0.0, 0.0)
        std = pre.std or (1.0, 1.0, 1.0)
        scale = [1.0 / (divisor * s) for s in std]
        shift = [-m / s for m, s in zip(mean, std, strict=True)]
        self.bgr = pre.channel_order == "bgr"  # mean and std are given in the model's channel order
        self.scale = torch.tensor(scale, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.shift = torch.tensor(shift, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:  # a model folder's own transform has already made the model's floats
            return batch.to(dtype=self.dtype, memory_format=self.memory_format)
        if self.bgr:
            batch = batch.flip(1)
        out = torch.addcmul(self.shift, batch.float(), self.scale)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)
