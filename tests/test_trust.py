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
from harness.errors import ConfigError
from harness.sources import build_config
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
    from harness.models.onnx_export import export
    from harness.tools.export_onnx import store_settings

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    path = folder / "tiny.onnx"
    settings = {"input_size": 32, "resize_size": 32, "label_map": "none", **settings}
    path.write_bytes(store_settings(export(tiny.eval(), torch.zeros(1, 3, 32, 32), 17), settings))
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


def test_a_run_setting_in_a_model_file_is_refused_naming_where_it_may_be_set(tmp_path: Path) -> None:
    from harness.config import ENV_FIELDS
    from harness.sources import model_setting

    by_variable = "gpus"  # HARNESS_GPUS-like: an environment variable sets it too
    variable = next(v for v, name in ENV_FIELDS.items() if name == by_variable)
    for name, where in ((by_variable, f"--gpus or {variable}"), ("max_failures", "--max-failures")):
        with pytest.raises(ConfigError) as refused:
            model_setting(name, 1, "model/config.yaml", tmp_path)
        assert str(refused.value) == (
            f"model/config.yaml: '{name}' is not the model's to set ({where}): a model's own files describe the "
            "model (its preprocessing, class, weights inside its folder, label map, softmax), not how or where it "
            "runs: set that on the command line or in the environment"
        )


def test_a_model_files_paths_are_its_folders_and_its_values_parsed_as_its_source_says(tmp_path: Path) -> None:
    from harness.sources import model_setting

    (tmp_path / "pkg").mkdir()
    assert model_setting("module", "pkg/net.py", "config.yaml", tmp_path) == "pkg/net.py"
    assert model_setting("checkpoint", "w.pth", "config.yaml", tmp_path) == str(tmp_path / "w.pth")
    assert model_setting("label_map", "labels.txt", "config.yaml", tmp_path) == str(tmp_path / "labels.txt")
    assert model_setting("label_map", "objectnet", "config.yaml", tmp_path) == "objectnet"
    with pytest.raises(ConfigError, match=r"^its metadata: "):
        model_setting("softmax", "perhaps", "its metadata", tmp_path)


def test_config_yaml_preprocessing_is_checked_as_the_models_own_and_named_by_its_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("preprocess:\n  input_size: big\n")
    with pytest.raises(ConfigError, match=r"config.yaml \(preprocess\): "):
        build_config({"model_dir": str(tmp_path)}, {})
    (tmp_path / "config.yaml").write_text("preprocess: [224]\n")
    with pytest.raises(ConfigError) as refused:
        build_config({"model_dir": str(tmp_path)}, {})
    assert str(refused.value).endswith(": 'preprocess' must be a mapping of setting: value")
