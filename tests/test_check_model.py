"""`harness check-model` on torchvision's ResNet-50 (random weights): the published 25.6M parameters, 4.1 GMACs."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from harness.cli import main
from harness.tools.check_model import ModelCost, broken_limits, count_flops


@pytest.fixture
def resnet50(tmp_path: Path) -> Path:
    folder = tmp_path / "resnet50"
    folder.mkdir()
    (folder / "model.py").write_text(
        "from torchvision.models.resnet import Bottleneck, ResNet\n\n\n"
        "class Model(ResNet):  # torchvision.models.resnet50(weights=None)\n"
        "    def __init__(self):\n"
        "        super().__init__(Bottleneck, [3, 4, 6, 3])\n"
    )
    return folder


@pytest.mark.slow  # about 10 s on two busy CPU cores
def test_resnet50_figures_and_broken_limits(resnet50: Path, capsys) -> None:
    """One measurement (ResNet-50 on the CPU is slow): the figures, then each broken limit, exit 9."""
    options = ["--model-dir", str(resnet50), "--batch-size", "2", "--repeats", "1"]
    limits = ["--max-params", "20e6", "--max-gflops", "5", "--max-gmacs", "5"]
    assert main(["check-model", *options, *limits]) == 9
    out, error = capsys.readouterr()
    assert "parameters  25,557,032 (25.6M)" in out
    assert "MACs        4.089 G per image (8.178 GFLOPs" in out
    assert "output      (2, 1000) for a batch of 2" in out and "ms per batch of 2 on cpu" in out
    assert error.strip() == (
        "harness: error: model over its limits: parameters 25,557,032 > limit 20,000,000; GFLOPs 8.178 > limit 5.000"
    )


def test_limits_that_hold_pass() -> None:
    cost = ModelCost(parameters=25_557_032, flops=8_178_368_512, output_shape=(2, 1000), batch_seconds=[0.1])
    assert broken_limits(cost, 30e6, 9, 5) == []
    assert broken_limits(cost, None, None, 4) == ["GMACs 4.089 > limit 4.000"]


def test_flops_of_one_convolution_by_hand() -> None:
    # 4 output channels x 6 x 6 positions x (3 channels x 3 x 3 kernel) multiply-adds, 2 FLOPs each
    assert count_flops(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False)), 8) == 2 * 4 * 6 * 6 * 3 * 3 * 3
