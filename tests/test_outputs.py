"""What a model returns is judged before the first row (harness/models/outputs.py, harness/pipeline/forward.py):
N x C real scores, or one score column; anything else is exit 4 naming what came back, and a batch run in pieces
never lets one piece's output overwrite another's."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cli import main
from tests.helpers import SAMPLES, read_rows

HEADER = """import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)
        self.calls = 0
        self.out = torch.zeros(64, 10)

    def logits(self, x):
        return self.fc(self.features(x))

    def forward(self, x):
        self.calls += 1
"""

RETURNS = {
    "reused-buffer": "        n = len(x)\n        self.out[:n].copy_(self.logits(x))\n        return self.out[:n]\n",
    "tuple": "        return self.features(x), self.logits(x)\n",
    "argmax": "        return self.logits(x).argmax(1)\n",
    "no-classes": "        return self.logits(x)[:, :0]\n",
    "bool": "        return self.logits(x) > 0\n",
    "complex": "        return self.logits(x).to(torch.complex64)\n",
    "dict-without-logits": "        return {'features': self.features(x)}\n",
    "width-changes": "        return self.logits(x)[:, : 10 if self.calls == 1 else 9]\n",
    "dict": "        return {'logits': self.logits(x)}\n",
}


def _model(tmp_path: Path, returns: str) -> Path:
    folder = tmp_path / returns
    folder.mkdir()
    (folder / "model.py").write_text(HEADER + RETURNS[returns])
    (folder / "config.yaml").write_text("preprocess:\n  input_size: 32\n  resize_size: 32\n")
    return folder


def _images(tmp_path: Path, count: int) -> Path:
    """`count` real photos, no two neighbours alike, so a piece that shows another piece's scores is seen."""
    folder = tmp_path / "images"
    folder.mkdir()
    samples = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    for index in range(count):
        source = samples[index % len(samples)]
        shutil.copy(source, folder / f"{index:03d}{source.suffix}")
    return folder


def _run(images: Path, output: Path, model: Path, *options: str) -> int:
    argv = [str(images), str(output), "--model", str(model), "--label-map", "none", "--progress", "false"]
    return main([*argv, "--fold-batchnorm", "false", "--channels-last", "false", *options])


def test_a_model_that_reuses_its_output_buffer_gives_the_same_rows_in_pieces(tmp_path: Path) -> None:
    """On the CPU a batch of 64 runs as two pieces of 32: each piece's scores are copied before the next runs."""
    images, model = _images(tmp_path, 57), _model(tmp_path, "reused-buffer")
    assert _run(images, tmp_path / "whole" / "p.csv", model, "--batch-size", "32") == 0
    assert _run(images, tmp_path / "pieces" / "p.csv", model, "--batch-size", "64") == 0
    assert read_rows(tmp_path / "pieces" / "p.csv") == read_rows(tmp_path / "whole" / "p.csv")


@pytest.mark.parametrize(
    ("returns", "said"),
    [
        ("tuple", "a tuple of 2 items"),
        ("argmax", "torch.int64 values, class ids"),
        ("no-classes", "no classes"),
        ("bool", "torch.bool values"),
        ("complex", "torch.complex64 values"),
        ("dict-without-logits", "features without 'logits'"),
        ("width-changes", "9 classes for a batch of 3 images, after 10"),
    ],
)
def test_an_output_that_is_not_scores_is_exit_4_before_a_wrong_row(tmp_path: Path, returns: str, said: str, capsys):
    output = tmp_path / "out" / "p.csv"
    assert _run(_images(tmp_path, 3), output, _model(tmp_path, returns)) == 4
    assert said in capsys.readouterr().err
    assert not output.exists()


def test_a_dict_with_logits_is_read(tmp_path: Path) -> None:
    assert _run(_images(tmp_path, 3), tmp_path / "out" / "p.csv", _model(tmp_path, "dict")) == 0


def test_an_onnx_model_with_several_outputs_needs_its_scores_named(tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnx")

    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.features(x)
            return features, self.fc(features)

    folder = tmp_path / "two"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            TwoOutputs().eval(),
            (torch.zeros(1, 3, 32, 32),),
            str(folder / "two.onnx"),
            dynamo=False,
            input_names=["images"],
            output_names=["features", "scores"],
            dynamic_axes={"images": {0: "n"}, "features": {0: "n"}, "scores": {0: "n"}},
        )
    (folder / "config.yaml").write_text("preprocess:\n  input_size: 32\n  resize_size: 32\n")
    images = _images(tmp_path, 3)
    output = tmp_path / "out" / "p.csv"
    assert _run(images, output, folder) == 4
    assert "2 outputs (features, scores): name the one that holds the scores with --output-name" in (
        capsys.readouterr().err
    )
    assert _run(images, output, folder, "--output-name", "nothing") == 4
    assert _run(images, output, folder, "--output-name", "scores") == 0
    assert all(len(row) == 11 for row in read_rows(output))
