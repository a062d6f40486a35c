"""The GPU paths on a real GPU (`pytest -m gpu`; skipped where CUDA is absent, as on the CPU machines CI runs
on): CUDA against the CPU, bf16 and fp16, channels_last, --compile, a real out-of-memory, DataParallel over every
visible GPU, and ONNX through onnxruntime's CUDA provider. scripts/gpu-check.sh runs them with the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.cli import main
from tests.helpers import SAMPLES, read_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]


def _run(tmp_path: Path, name: str, *options: str) -> dict[str, list[str]]:
    output = tmp_path / name / "predictions.csv"
    assert main([str(SAMPLES), str(output), "--progress", "false", *options]) == 0
    return {row[0]: row[1:] for row in read_rows(output)}


@pytest.fixture(scope="module")
def cpu_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    return _run(tmp_path_factory.mktemp("cpu"), "cpu", "--device", "cpu", "--label-map", "none")


def _close(rows: dict[str, list[str]], reference: dict[str, list[str]], tolerance: float) -> None:
    assert sorted(rows) == sorted(reference)
    for key, row in reference.items():
        assert rows[key][0] == row[0], key
        assert abs(float(rows[key][1]) - float(row[1])) < tolerance, key


def _top1_agreement(rows: dict[str, list[str]], reference: dict[str, list[str]]) -> int:
    return sum(rows[key][0] == row[0] for key, row in reference.items())


def test_cuda_gives_the_cpus_top1_within_1e3(tmp_path: Path, cpu_rows) -> None:
    _close(_run(tmp_path, "cuda", "--device", "cuda", "--gpus", "1", "--label-map", "none"), cpu_rows, 1e-3)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_agrees_on_top1(tmp_path: Path, cpu_rows, amp: str) -> None:
    rows = _run(tmp_path, amp, "--device", "cuda", "--gpus", "1", "--amp", amp, "--label-map", "none")
    assert _top1_agreement(rows, cpu_rows) >= len(cpu_rows) - 1
    # the folds are checked in float32 whatever the AMP, so they still happen
    assert json.loads((tmp_path / amp / "run.json").read_text())["fold_batchnorm"]["folded"] == 49


def test_channels_last_on_cuda(tmp_path: Path, cpu_rows) -> None:
    options = ["--device", "cuda", "--gpus", "1", "--channels-last", "true", "--label-map", "none"]
    _close(_run(tmp_path, "cl", *options), cpu_rows, 1e-3)


def test_compile_on_cuda(tmp_path: Path, cpu_rows) -> None:
    rows = _run(tmp_path, "compiled", "--device", "cuda", "--gpus", "1", "--compile", "--label-map", "none")
    assert _top1_agreement(rows, cpu_rows) >= len(cpu_rows) - 1


HUNGRY = """import torch


class Hungry(torch.nn.Module):
    \"\"\"Asks the GPU for a sixth of its memory per image: a batch of 8 or more cannot fit, 4 can.\"\"\"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x):
        if x.is_cuda:
            total = torch.cuda.get_device_properties(x.device).total_memory
            scratch = torch.empty(x.shape[0] * (total // 6), dtype=torch.uint8, device=x.device)
            del scratch
        return self.fc(x.float().mean((2, 3)))
"""


def test_a_real_out_of_memory_halves_the_batch_and_completes(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(HUNGRY)
    (folder / "config.yaml").write_text("class_name: Hungry\n")
    common = ["--model", str(folder), "--batch-size", "16", "--label-map", "none"]
    cpu = _run(tmp_path, "cpu", *common, "--device", "cpu")
    gpu = _run(tmp_path, "gpu", *common, "--device", "cuda", "--gpus", "1")
    _close(gpu, cpu, 1e-4)


def test_data_parallel_over_every_visible_gpu(tmp_path: Path, cpu_rows) -> None:
    count = torch.cuda.device_count()
    rows = _run(tmp_path, "dp", "--device", "cuda", "--gpus", str(count), "--batch-size", "4", "--label-map", "none")
    _close(rows, cpu_rows, 1e-3)
    report = json.loads((tmp_path / "dp" / "run.json").read_text())
    assert report["devices"]["gpus"] == list(range(count)) and report["batch_size_total"] == 4 * count


def test_onnx_through_the_cuda_provider(tmp_path: Path, cpu_rows) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    pytest.importorskip("onnx")
    exported = tmp_path / "m" / "model.onnx"
    exported.parent.mkdir()
    assert main(["export-onnx", "--output", str(exported), "--device", "cpu"]) == 0
    rows = _run(tmp_path, "onnx", "--model", str(exported), "--device", "cuda", "--label-map", "none")
    _close(rows, cpu_rows, 1e-3)
    report = json.loads((tmp_path / "onnx" / "run.json").read_text())
    assert "CUDAExecutionProvider" in report["model"]["class"]
