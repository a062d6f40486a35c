"""ONNX models: export with parity, runs through the harness like PyTorch models, and the CPU-fallback warning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnxruntime
import pytest
import torch
from torch import nn

from harness.cli import main
from harness.errors import ModelError
from harness.models.kinds import find_saved_file
from harness.models.load import load_model
from harness.models.onnx_export import export
from harness.models.onnx_metadata import metadata, read_metadata, with_metadata
from harness.models.onnx_runtime import CUDA_PROVIDER, OnnxModule, make_session
from harness.sources import build_config
from harness.tools.export_onnx import check_parity
from tests.helpers import REPO, SAMPLES, ids_and_confidences, read_rows

pytest.importorskip("onnx")  # the exporter needs it; onnxruntime alone runs ONNX models


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    folder = tmp_path / "onnx-model"
    folder.mkdir()
    (folder / "tiny.onnx").write_bytes(export(_tiny().eval(), torch.zeros(1, 3, 64, 64), 17))
    (folder / "config.yaml").write_text("preprocess:\n  input_size: 64\n  resize_size: 64\n")
    return folder


def test_an_onnx_folder_runs_like_a_pytorch_model(tiny_onnx: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "predictions.csv"
    options = ["--model-dir", str(tiny_onnx), "--label-map", "none", "--batch-size", "8", "--progress", "false"]
    assert main([str(SAMPLES), str(output), *options]) == 0
    rows = read_rows(output)
    assert len(rows) == 19 and all(len(row) == 11 for row in rows)
    assert all(0 <= i < 10 for row in rows for i in ids_and_confidences(row)[0])


@pytest.mark.equivalence
def test_dynamic_batch_and_parity_with_torch(tiny_onnx: Path) -> None:
    session = make_session(tiny_onnx / "tiny.onnx", want_cuda=False)
    images = torch.randn(7, 3, 64, 64)
    parity = check_parity(_tiny().eval(), OnnxModule(session), images, batch_size=3)  # batches of 3, 3, 1
    assert parity.top1_agree == 7 and parity.max_prob_diff < 1e-5


def test_an_appended_metadata_entry_is_read_by_onnxruntime_and_here_and_leaves_the_model_as_it_was(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    """Protobuf reads a repeated field given in pieces as one: the entry appended to the bytes joins the ones the
    exporter wrote, for onnxruntime and for the reader here, and the model runs as before. Lengths over 127 take
    a varint of two bytes or more."""
    import onnx

    model = onnx.load(tiny_onnx / "tiny.onnx")
    onnx.helper.set_model_props(model, {"written": "by the exporter"})
    data = model.SerializeToString()
    value = "v" * 300 + "é"
    appended = with_metadata(data, "harness.engine", value)
    assert appended.startswith(data) and metadata(data) == {"written": "by the exporter"}
    assert metadata(appended) == {"written": "by the exporter", "harness.engine": value}
    (tmp_path / "appended.onnx").write_bytes(appended)
    assert read_metadata(tmp_path / "appended.onnx") == metadata(appended)
    session = make_session(appended, want_cuda=False)
    assert session.get_modelmeta().custom_metadata_map == metadata(appended)
    images = torch.randn(3, 3, 64, 64)
    before = OnnxModule(make_session(data, want_cuda=False))(images)
    assert torch.equal(OnnxModule(session)(images), before)
    assert metadata(b"\xff") == {} and metadata(b"") == {}  # not ONNX: no entries, no error


def test_releasing_the_arena_leaves_the_session_as_it_was(tiny_onnx: Path) -> None:
    module = OnnxModule(make_session(tiny_onnx / "tiny.onnx", want_cuda=False, threads=1))
    images = torch.randn(5, 3, 64, 64)
    before = module(images)
    module.release_memory(images[:1])
    assert torch.equal(module(images), before)


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own, quieter warning
def test_a_silent_cpu_fallback_is_warned_about(tiny_onnx: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"])
    session = make_session(tiny_onnx / "tiny.onnx", want_cuda=True)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "WARNING: onnxruntime could not start its CUDA provider" in capsys.readouterr().err


def test_two_onnx_files_need_a_name_and_model_py_wins(tiny_onnx: Path) -> None:
    (tiny_onnx / "other.onnx").write_bytes((tiny_onnx / "tiny.onnx").read_bytes())
    with pytest.raises(ModelError, match=r"2 \.onnx files: name one with --module"):
        load_model(build_config({"model_dir": str(tiny_onnx)}, {}))
    loaded = load_model(build_config({"model_dir": str(tiny_onnx), "module": "other.onnx"}, {}))
    assert isinstance(loaded.module, OnnxModule) and loaded.source.endswith("other.onnx")
    (tiny_onnx / "model.py").write_text("")
    assert find_saved_file(build_config({"model_dir": str(tiny_onnx)}, {}), (".onnx",)) is None


@pytest.mark.parametrize("tool", ["check-model", "export-onnx"])
def test_tools_for_pytorch_models_refuse_an_onnx_one_by_its_kind(tool: str, tiny_onnx: Path, tmp_path, capsys) -> None:
    extra = ["--output", str(tmp_path / "again.onnx")] if tool == "export-onnx" else []
    assert main([tool, "--model", str(tiny_onnx / "tiny.onnx"), *extra]) == 2
    assert "(onnx) is not a PyTorch model" in capsys.readouterr().err
    assert not (tmp_path / "again.onnx").exists()


def test_an_onnx_run_leaves_the_layout_to_its_runtime(tiny_onnx: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "predictions.csv"
    options = ["--model-dir", str(tiny_onnx), "--label-map", "none", "--channels-last", "auto", "--progress", "false"]
    assert main([str(SAMPLES), str(output), *options]) == 0
    layout = json.loads((output.parent / "run.json").read_text())["layout"]
    assert layout["channels_last"] is False and "runs the model and chooses its layout" in layout["why"]


@pytest.mark.equivalence
@pytest.mark.slow  # exports and runs the real EfficientNet-Lite0 twice: about 40 s on two CPU cores
def test_real_model_export_parity_and_same_top1_in_a_run(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "lite0-onnx"
    folder.mkdir()
    assert main(["export-onnx", "--output", str(folder / "model.onnx"), "--batch-size", "8"]) == 0
    line = capsys.readouterr().out
    assert "on 19 images: top-1 agrees on 19" in line
    assert float(re.search(r"probability difference\| ([\d.e+-]+)", line).group(1)) < 1e-4
    config = (REPO / "model" / "config.yaml").read_text()
    (folder / "config.yaml").write_text(re.sub(r"(?m)^class_name:.*$", "", config))
    common = ["--label-map", "objectnet-legacy", "--progress", "false"]
    assert main([str(SAMPLES), str(tmp_path / "onnx.csv"), "--model-dir", str(folder), *common]) == 0
    assert main([str(SAMPLES), str(tmp_path / "torch.csv"), *common]) == 0
    onnx_rows, torch_rows = read_rows(tmp_path / "onnx.csv"), read_rows(tmp_path / "torch.csv")
    assert [r[:2] for r in onnx_rows] == [r[:2] for r in torch_rows]
    assert max(abs(float(a[2]) - float(b[2])) for a, b in zip(onnx_rows, torch_rows, strict=True)) < 1e-4


EXPORTED = """import torch


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, CLASSES)

    def forward(self, x):
        return self.fc(x.mean((2, 3))) + NOISE * torch.rand(x.shape[0], CLASSES)
"""


def _export_folder(tmp_path: Path, classes: int = 10, noise: float = 0.0) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "model.py").write_text(EXPORTED.replace("CLASSES", str(classes)).replace("NOISE", str(noise)))
    (folder / "config.yaml").write_text("class_name: Small\nlabel_map: none\npreprocess:\n  input_size: 32\n")
    return folder


@pytest.mark.parametrize(
    ("case", "code", "said"),
    [
        ("unreadable", 3, "none of the 2 images"),
        ("no classes", 4, "no classes"),
        ("differs", 9, "nothing written to"),
        ("tolerance nan", 2, "argument --tolerance: nan: give a finite number above 0"),
        ("onto a photo", 6, "not a .onnx file name"),
        ("onto a folder", 6, "is a folder"),
    ],
)
def test_a_failed_export_is_its_exit_code_and_leaves_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, code: int, said: str
) -> None:
    folder = _export_folder(tmp_path, classes=0 if case == "no classes" else 10, noise=10.0 if case == "differs" else 0)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(b"not a png" if case == "unreadable" else (SAMPLES / "coffee.png").read_bytes())
    output = {"onto a photo": images / "a.png", "onto a folder": images}.get(case, tmp_path / "out" / "m.onnx")
    before = sorted(tmp_path.rglob("*"))
    options = ["--tolerance", "nan"] if case == "tolerance nan" else []
    argv = ["export-onnx", "--model", str(folder), "--output", str(output), "--images", str(images), *options]
    assert main(argv) == code
    assert said in capsys.readouterr().err
    new = set(tmp_path.rglob("*")) - set(before)
    assert all(path.is_dir() or "__pycache__" in path.parts for path in new), new
    assert (images / "a.png").read_bytes()[:9] == (b"not a png" if case == "unreadable" else b"\x89PNG\r\n\x1a\n\x00")


def test_a_matching_export_is_written_with_its_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out" / "m.onnx"
    assert main(["export-onnx", "--model", str(_export_folder(tmp_path)), "--output", str(output)]) == 0
    assert f"written to {output}" in capsys.readouterr().out
    assert sorted(path.name for path in output.parent.iterdir()) == ["m.onnx"]
