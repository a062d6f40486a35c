"""A submission is untrusted: nothing inside a model (an ONNX file's metadata, a zip's or folder's config.yaml) may
grant trust, move the output, change the run's limits or reach outside its folder. Each planted payload would
create a sentinel file if its code ran; the sentinel must stay absent, and the run exit 2 naming the key and file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cli import main
from tests.helpers import SAMPLES

pytest.importorskip("onnx")


class Payload:
    """Unpickling this opens (creates) the sentinel file: code from the file running."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (open, (str(self.sentinel), "w"))


def _pickled(sentinel: Path) -> bytes:
    data = io.BytesIO()
    torch.save(Payload(sentinel), data)
    return data.getvalue()


def _onnx_with_settings(folder: Path, settings: dict) -> Path:
    from harness.tools.export_onnx import export, store_settings

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    path = folder / "tiny.onnx"
    settings = {"input_size": 32, "resize_size": 32, "label_map": "none", **settings}
    path.write_bytes(store_settings(export(tiny.eval(), 32, 17), settings))
    return path


@pytest.mark.parametrize(
    "planted",
    [
        {"module": "weights.pt", "trust_pickle": True},
        {"trust_pickle": True},
        {"module": "weights.pt"},
        {"output_file": "elsewhere.csv"},
        {"max_failures": 1000},
        {"label_map": "/etc/hostname"},
        {"device": "cpu"},
        {"checkpoint": "weights.pt"},
    ],
    ids=lambda planted: "+".join(planted),
)
def test_an_onnx_files_metadata_grants_nothing(tmp_path: Path, planted: dict, capsys: pytest.CaptureFixture) -> None:
    sentinel = tmp_path / "sentinel"
    folder = tmp_path / "submission"
    onnx_file = _onnx_with_settings(folder, planted)
    (folder / "weights.pt").write_bytes(_pickled(sentinel))
    output = tmp_path / "out" / "predictions.csv"
    code = main([str(SAMPLES), str(output), "--model", str(onnx_file), "--progress", "false"])
    assert code == 2
    error = capsys.readouterr().err
    assert str(onnx_file) in error and f"'{next(iter(planted))}'" in error.replace('"', "'")
    assert not sentinel.exists(), "code from the submission ran"
    assert not output.exists() and not (tmp_path / "elsewhere.csv").exists()


def test_the_person_running_still_decides_over_the_files_own_settings(tmp_path: Path) -> None:
    onnx_file = _onnx_with_settings(tmp_path / "m", {"softmax": False})
    output = tmp_path / "out" / "p.csv"
    assert main([str(SAMPLES), str(output), "--model", str(onnx_file), "--progress", "false", "--topk", "2"]) == 0
    assert '"softmax": false' in (tmp_path / "out" / "run.json").read_text()


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("trust_pickle: true\nmodule: model.pt\n", "trust_pickle"),
        ("module: model.pt\ntrust_pickle: true\n", "trust_pickle"),
        ("module: ../outside.pt\n", "module"),
        ("checkpoint: /etc/passwd\nclass_name: Tiny\n", "checkpoint"),
        ("label_map: ../../etc/hostname\n", "label_map"),
        ("output_file: /tmp/elsewhere.csv\n", "output_file"),
        ("max_failures: 1000\n", "max_failures"),
        ("model: hf:/somewhere/else\n", "model"),
    ],
)
def test_a_zips_config_yaml_grants_nothing(tmp_path: Path, config: str, key: str, capsys) -> None:
    sentinel = tmp_path / "sentinel"
    submission = tmp_path / "submission.zip"
    with zipfile.ZipFile(submission, "w") as archive:
        archive.writestr("config.yaml", config)
        archive.writestr("model.pt", _pickled(sentinel))
    output = tmp_path / "out" / "predictions.csv"
    code = main([str(SAMPLES), str(output), "--model", str(submission), "--progress", "false"])
    assert code == 2
    error = capsys.readouterr().err
    assert "config.yaml" in error and key in error
    assert not sentinel.exists(), "code from the submission ran"


def test_trust_pickle_from_the_command_line_is_the_only_way_in(tmp_path: Path) -> None:
    """The same pickled module loads when the person running says so, and only then (the sentinel proves the code
    ran: trusting a pickle means exactly that)."""
    sentinel = tmp_path / "sentinel"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.pt").write_bytes(_pickled(sentinel))
    output = tmp_path / "out" / "p.csv"
    assert main([str(SAMPLES), str(output), "--model", str(folder / "model.pt"), "--progress", "false"]) == 4
    assert not sentinel.exists()
    argv = [str(SAMPLES), str(output), "--model", str(folder / "model.pt"), "--progress", "false", "--trust-pickle"]
    assert main(argv) == 4  # it is no model, but its code ran: what --trust-pickle allows
    assert sentinel.exists()
