"""The harness's own speed-ups never change an answer: random models drawn from a small zoo of blocks (plain
convolution + BatchNorm pairs, branches that read the pre-BatchNorm activations, in-place changes, hooks that
change an output, buffers, shared convolutions, reads of a BatchNorm's attributes, activations `.view()`ed) give
the same top-5 ids with every speed-up on (BatchNorm folding, the measured memory layout, batches in pieces) as
with all off, or the speed-up is declined."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from harness.config import Preprocess
from harness.models.fold import fold_batchnorm
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import DeviceNormalizer, DevicePlan, fold_sample
from harness.pipeline.files import discover
from harness.pipeline.forward import Forward
from harness.pipeline.layout import choose_layout
from harness.pipeline.loader import ImageDataset, check_sample
from tests.helpers import SAMPLES, compare_rows

PRE = Preprocess(border=0, input_size=32, resize_size=32)
CPU = DevicePlan(torch.device("cpu"))
WIDTH = 6


class Block(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv, self.bn = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=kind == "buffer"), nn.BatchNorm2d(WIDTH)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, WIDTH).view(1, WIDTH, 1, 1))
        if kind == "hooked":  # a hook that changes the BatchNorm's output: lost if the BatchNorm were folded away
            self.bn.register_forward_hook(lambda module, inputs, output: output * 1.7 + 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pre-bn-branch":
            y = self.conv(x)
            return F.relu(self.bn(y)) + F.relu(y - 0.5)
        if self.kind == "in-place":
            return F.relu(self.bn(self.conv(x).mul_(1.3)))
        if self.kind == "shared":
            return F.relu(self.bn(self.conv(x))) + self.conv(x)
        if self.kind == "buffer":
            return F.relu(self.bn(self.conv(x))) * self.gain
        if self.kind == "attributes":
            return F.relu(self.bn(self.conv(x)))[:, : self.bn.num_features] * (self.bn.eps / 1e-5)
        if self.kind == "view":
            y = F.relu(self.bn(self.conv(x)))
            return y.view(y.shape[0], WIDTH, -1).view_as(y)
        return F.relu(self.bn(self.conv(x)))


class Zoo(nn.Module):
    def __init__(self, kinds: list[str], classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*(Block(kind) for kind in kinds))
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


KINDS = ["plain", "pre-bn-branch", "in-place", "hooked", "shared", "buffer", "attributes", "view"]
DATASET = ImageDataset(discover(SAMPLES), Decoding(PRE))
IMAGES = torch.stack([DATASET[i][1] for i in range(len(DATASET))])  # every sample image, uint8


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(WIDTH, generator=generator))
            module.running_var.copy_(torch.rand(WIDTH, generator=generator) + 0.3)
            module.weight.data.copy_(torch.rand(WIDTH, generator=generator) * 2)
            module.bias.data.copy_(torch.randn(WIDTH, generator=generator))
    return model.eval()


def _rows(scores: torch.Tensor) -> list[list[str]]:
    values, ids = scores.softmax(1).topk(min(5, scores.shape[1]), dim=1)
    rows = []
    for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True):
        pairs = zip(map(str, row_ids), map(str, row_values), strict=True)
        rows.append(["image", *(field for pair in pairs for field in pair)])
    return rows


@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
    classes=st.integers(min_value=5, max_value=40),
    seed=st.integers(min_value=0, max_value=2**16),
)
@settings(max_examples=40, deadline=None)
def test_every_speed_up_keeps_the_top5_or_is_declined(kinds: list[str], classes: int, seed: int) -> None:
    torch.manual_seed(seed)
    written = _randomised(Zoo(kinds, classes), seed)
    optimised = copy.deepcopy(written)
    for block, original in zip(optimised.blocks, written.blocks, strict=True):  # deepcopy keeps the hook's target
        if original.kind == "hooked":
            block.bn._forward_hooks = original.bn._forward_hooks.copy()
    with torch.inference_mode():
        expected = written(DeviceNormalizer(PRE, CPU.device, torch.float32, False)(IMAGES)).float()

    sample = check_sample(DATASET)
    fold_batchnorm(optimised, fold_sample(_config(), CPU, sample), lambda output: output)
    layout = choose_layout(optimised, CPU, PRE, sample, batch_size=8)
    plan = DevicePlan(CPU.device, channels_last=layout.channels_last)
    forward = Forward(
        optimised, DeviceNormalizer(PRE, plan.device, torch.float32, plan.channels_last), plan, 4, classes
    )
    got = forward(IMAGES).float()
    for want_row, got_row in zip(_rows(expected), _rows(got), strict=True):
        problems, worst = compare_rows(want_row, got_row, 1e-4)
        assert not problems and worst <= 1e-4, (kinds, problems, worst)


def _config():
    from harness.sources import build_config

    return build_config({"fold_batchnorm": "true"}, {}, {})
