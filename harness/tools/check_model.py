"""`harness check-model`: a model's size and cost before a submission, and limits that fail the check.

FLOPs come from PyTorch's own counter, `torch.utils.flop_counter.FlopCounterMode`: it counts the matrix
multiplications and convolutions (not element-wise ops such as activations or batch norm), a multiply-add as
2 FLOPs. MACs are half its total: torchvision's ResNet-50 at 224 x 224 is 4.09 GMACs, 8.18 GFLOPs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.config import Config
from harness.errors import CheckFailedError, ConfigError, ModelError
from harness.models.load import load_model
from harness.models.outputs import as_logits
from harness.pipeline.devices import DevicePlan, inference_context, plan_devices, prepare_model

CHANNELS = 3


@dataclass
class ModelCost:
    parameters: int
    flops: int  # per image, at the input size
    output_shape: tuple[int, ...]
    batch_seconds: list[float]

    @property
    def macs(self) -> float:
        return self.flops / 2


def count_flops(model: nn.Module, input_size: int) -> int:
    """FLOPs for one image (a multiply-add counts 2).

    Counted on a copy on the meta device, which tracks shapes without computing (a fraction of a real pass's
    time); a model that cannot run there (data-dependent code) is counted by a real CPU pass.
    """
    try:
        return _flops_on(copy.deepcopy(model).to("meta"), torch.device("meta"), input_size)
    except Exception:
        return _flops_on(model, torch.device("cpu"), input_size)


def _flops_on(model: nn.Module, device: torch.device, input_size: int) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, CHANNELS, input_size, input_size, device=device))
    return counter.get_total_flops()


def time_batches(
    model: nn.Module, plan: DevicePlan, batch: int, input_size: int, repeats: int
) -> tuple[tuple[int, ...], list[float]]:
    """(output shape, seconds per batch for each repeat), after one warm-up batch."""
    images = torch.randn(batch, CHANNELS, input_size, input_size, device=plan.device)
    seconds = []
    with inference_context(plan):
        output = as_logits(model(images), batch)
        for _ in range(repeats):
            if plan.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images)
            if plan.device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return tuple(output.shape), seconds


def measure(model: nn.Module, plan: DevicePlan, batch: int, input_size: int, repeats: int) -> ModelCost:
    try:
        flops = count_flops(model, input_size)
        shape, seconds = time_batches(prepare_model(model, plan)[0], plan, batch, input_size, repeats)
    except ModelError:  # already says what is wrong with the output
        raise
    except Exception as error:  # user code
        message = f"the model failed on {input_size} x {input_size} input: {type(error).__name__}: {error}"
        raise ModelError(message) from None
    return ModelCost(sum(p.numel() for p in model.parameters()), flops, shape, seconds)


def broken_limits(
    cost: ModelCost, max_params: float | None, max_gflops: float | None, max_gmacs: float | None
) -> list[str]:
    limits = (
        ("parameters", cost.parameters, max_params, ",.0f"),
        ("GFLOPs", cost.flops / 1e9, max_gflops, ".3f"),
        ("GMACs", cost.macs / 1e9, max_gmacs, ".3f"),
    )
    return [
        f"{name} {value:{style}} > limit {limit:{style}}"
        for name, value, limit, style in limits
        if limit is not None and value > limit
    ]


def check_model(args: argparse.Namespace, config: Config) -> int:
    """check-model, in a confined process (harness/tools/commands.py read its command line)."""
    loaded = load_model(config)
    if not loaded.kind.torch_graph:
        raise ConfigError(
            f"{loaded.source} ({loaded.kind.name}) is not a PyTorch model: check-model measures the folder it came from"
        )
    plan = plan_devices(config)
    size = config.preprocess.input_size
    cost = measure(loaded.module, plan, config.batch_size, size, max(1, args.repeats))
    median = statistics.median(cost.batch_seconds)
    print(f"model       {loaded.class_name} ({loaded.source})")
    print(f"parameters  {cost.parameters:,} ({cost.parameters / 1e6:.1f}M)")
    print(f"input       N x {CHANNELS} x {size} x {size}")
    print(f"MACs        {cost.macs / 1e9:.3f} G per image ({cost.flops / 1e9:.3f} GFLOPs, torch.utils.flop_counter)")
    print(f"output      {cost.output_shape} for a batch of {config.batch_size}")
    print(
        f"time        {median * 1000:.1f} ms per batch of {config.batch_size} on {plan.device} "
        f"({config.batch_size / median:.1f} images/s, median of {len(cost.batch_seconds)})"
    )
    broken = broken_limits(cost, args.max_params, args.max_gflops, args.max_gmacs)
    if broken:
        raise CheckFailedError("model over its limits: " + "; ".join(broken))
    return 0
