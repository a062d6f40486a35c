"""The model's memory layout chosen by measurement (`channels_last: auto`): a few batches of seeded random images
timed in both layouts on the run's own device, before the first real batch and while the head start decodes.

channels_last pays well for some models on the CPU and little or nothing for others (docs/benchmarks.md); which
layout wins depends on the model, the device and the batch, so it is measured, not guessed. The outputs of the two
layouts differ in the last digits, so the run keeps its choice: run.json records it with both times, and a resumed
run takes the one the run it continues made (harness/pipeline/resume.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from harness.config import Config, Preprocess
from harness.errors import describe_user_error, model_code
from harness.models.outputs import SAME_ATOL, SAME_RTOL, as_logits
from harness.pipeline.devices import DeviceNormalizer, DevicePlan, inference_context
from harness.pipeline.resume import recorded_choice

# Timed passes per layout on a GPU (on the CPU see CPU_TRIAL_MAX_ROUNDS), alternating; the faster of each layout's
# counts. Its first pass also warms a layout up (oneDNN's or cuDNN's kernels chosen, weights reordered), which the
# second then does not pay: a separate warm-up pass before them cost a third of the trial and ranked the layouts no
# differently (docs/benchmarks.md).
TRIAL_ROUNDS = 2
# A CPU batch of the run's size takes seconds; per image a smaller one ranks the layouts alike, when it runs on the
# run's threads (one thread alone ranked ResNet-50's layouts nearly even, which the run does not). 8 a pass ranked
# them more clearly but doubled the trial's cost (docs/benchmarks.md).
CPU_TRIAL_IMAGES = 4
# A few images rank the layouts less clearly than the run's pieces do, and a 4-image trial now and then ranked
# ResNet-50's the wrong way round (docs/benchmarks.md). So on the CPU the default layout is kept only when it was
# this much faster.
CPU_CONTIGUOUS_MARGIN = 1.05
# On the CPU channels_last is the layout oneDNN's convolutions prefer: it was the faster at the run's pieces for
# most timm models tried (docs/benchmarks.md). So the trial stops at the first round after which channels_last
# would be kept; a model that looks clearly faster contiguous gets more rounds, up to this many, before contiguous
# is kept.
CPU_TRIAL_MAX_ROUNDS = 4
# On the CPU the trial's passes are model work the run would not otherwise do: a run of fewer images than this many
# times the trial's keeps the default layout, so a trial is made where the layout kept would repay it by saving a
# tenth of each image's time (channels_last saved about 40% of ResNet-50's and of EfficientNet-Lite0's: docs/speed.md).
CPU_PAYBACK = 10
LAYOUTS = {False: "contiguous", True: "channels_last"}


@dataclass(frozen=True)
class LayoutChoice:
    channels_last: bool
    ms_per_image: dict[str, float]  # the fastest timed pass of each layout tried
    why: str
    trial_s: float = 0.0  # what the measuring cost

    def describe(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def settle_layout(
    config: Config,
    model: nn.Module,
    plan: DevicePlan,
    sample: torch.Tensor,
    batch_size: int,
    images: int,
    runtime: str | None = None,
) -> tuple[DevicePlan, LayoutChoice]:
    """The layout for a run of `images`, the model put in it: as `channels_last` says, or for `auto` as the run a
    resumed one continues chose, or the default where a trial cannot pay on the CPU or another `runtime` than
    PyTorch runs the model (its kind says: harness/models/kinds.py), or else as measured now."""
    if config.channels_last != "auto":
        return plan, LayoutChoice(plan.channels_last, {}, f"set: channels_last {str(plan.channels_last).lower()}")
    recorded = recorded_choice(config.output_file, "channels_last", (False, True)) if config.resume else None
    cpu_trial_images = min(batch_size, CPU_TRIAL_IMAGES) * 2 * TRIAL_ROUNDS
    if recorded is not None:
        choice = LayoutChoice(recorded, {}, "the choice of the run this one resumes")
        _put(model, recorded)
    elif runtime is not None:
        choice = LayoutChoice(False, {}, f"{runtime} runs the model and chooses its layout")
    elif plan.device.type == "cpu" and images < CPU_PAYBACK * cpu_trial_images:
        choice = LayoutChoice(False, {}, f"{images} images are too few to pay for a trial on the CPU")
    else:
        choice = choose_layout(model, plan, config.preprocess, sample, batch_size)
    return dataclasses.replace(plan, channels_last=choice.channels_last), choice


def choose_layout(
    model: nn.Module, plan: DevicePlan, pre: Preprocess, sample: torch.Tensor, batch_size: int
) -> LayoutChoice:
    """Time the model in both layouts and leave it in the faster, or in the default (contiguous) one where
    channels_last fails or gives other scores (a model that .view()s its activations). `model` is in the default
    layout on `plan.device`; `sample` is the check images as the decoders make them (uint8, or a model folder's
    floats; harness/pipeline/loader.py: check_sample), repeated to the trial's count."""
    started = time.perf_counter()
    count = batch_size if plan.device.type == "cuda" else min(batch_size, CPU_TRIAL_IMAGES)
    images = sample.repeat(-(-count // len(sample)), 1, 1, 1)[:count].to(plan.device)
    outputs: dict[bool, torch.Tensor] = {}
    times: dict[bool, list[float]] = {False: [], True: []}
    failed = ""
    cpu = plan.device.type == "cpu"
    margin = CPU_CONTIGUOUS_MARGIN if cpu else 1.0
    for _ in range(CPU_TRIAL_MAX_ROUNDS if cpu else TRIAL_ROUNDS):
        for last in (False, True):
            try:
                seconds, output = _timed_pass(model, plan, pre, images, last)
            except Exception as error:  # the user's model, in a layout it may not have been written for
                failed = f"{LAYOUTS[last]} failed on {count} random images: {describe_user_error(error)}"
                break
            outputs.setdefault(last, output)
            times[last].append(seconds / count)
        if failed or (cpu and _keeps_channels_last(times, margin)):
            break
    fastest = {last: min(each) for last, each in times.items() if each}
    ms = {LAYOUTS[last]: round(1000 * seconds, 3) for last, seconds in fastest.items()}
    if failed:
        last, why = False, failed
    elif not torch.allclose(outputs[False], outputs[True], rtol=SAME_RTOL, atol=SAME_ATOL):
        last, why = False, "channels_last gives other scores"
    else:
        last = _keeps_channels_last(times, margin)
        if last and fastest[True] >= fastest[False]:
            why = f"channels_last was within {margin - 1:.0%} of contiguous on {count} images: a close trial on the CPU"
        else:
            passes = len(times[last])
            why = f"{LAYOUTS[last]} was faster on {count} images x {passes} timed pass{'es' if passes > 1 else ''}"
    _put(model, last)
    return LayoutChoice(last, ms, why, round(time.perf_counter() - started, 3))


def _keeps_channels_last(times: dict[bool, list[float]], margin: float) -> bool:
    """The trial's rule, applied after each CPU round and once at the end: channels_last's fastest pass took less
    than `margin` times contiguous's (above 1, a close trial keeps channels_last)."""
    return min(times[True]) < margin * min(times[False])


def _put(model: nn.Module, channels_last: bool) -> None:
    with model_code("to(memory_format)"):
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _timed_pass(
    model: nn.Module, plan: DevicePlan, pre: Preprocess, images: torch.Tensor, channels_last: bool
) -> tuple[float, torch.Tensor]:
    _put(model, channels_last)
    normalize = DeviceNormalizer(pre, plan.device, plan.input_dtype, channels_last)
    started = time.perf_counter()
    with inference_context(plan):
        output = model(normalize(images))
        scores = as_logits(output, len(images)).float().cpu()  # .cpu() waits for a CUDA device to finish
    return time.perf_counter() - started, scores
