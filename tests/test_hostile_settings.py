"""Mistakes in settings and in a model's own files, made by a user or planted by a submission: each is its
documented exit code and one line naming what to change, before any image is read."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from harness.cli import main
from tests.helpers import REPO, SAMPLES, tiny_hf_vit


def _run(tmp_path: Path, *options: str) -> int:
    return main([str(SAMPLES), str(tmp_path / "out" / "p.csv"), "--progress", "false", *options])


def _one_error_line(err: str, *said: str) -> None:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("harness: error: ") and "Traceback" not in err, err
    assert all(text in lines[-1] for text in said), lines[-1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_vit(tmp_path_factory.mktemp("hf"), classes=5, image_size=32)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"resample": "bilinear"}, 'resample "bilinear" is not one of'),
        ({"resample": 9}, "resample 9 is not one of"),
        ({"size": {"shortest_edge": "sixty-four"}, "crop_pct": 0.875}, 'shortest_edge "sixty-four" is not a whole'),
        ({"size": {"shortest_edge": 32}, "crop_pct": 0}, "crop_pct 0 is not a number in (0, 1]"),
        ({"size": {"shortest_edge": 32}, "crop_pct": "0.875"}, 'crop_pct "0.875" is not a number'),
        ({"size": {"shortest_edge": 32}, "crop_pct": [1]}, "crop_pct [1] is not a number"),
        ({"rescale_factor": "1/255"}, 'rescale_factor "1/255" is not a number'),
        ({"size": {"height": 32, "width": True}}, "is not square"),
    ],
)
@pytest.mark.parametrize("tool", ["run", "check-model"])
def test_a_hugging_face_processor_with_values_it_cannot_mean_is_exit_4(
    tmp_path: Path, hf_folder: Path, change: dict, said: str, tool: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    for path in hf_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    processor = folder / "preprocessor_config.json"
    processor.write_text(json.dumps({**json.loads(processor.read_text()), **change}))
    if tool == "run":
        assert _run(tmp_path, "--model", str(folder), "--label-map", "none") == 4
    else:
        assert main(["check-model", "--model", str(folder), "--repeats", "1"]) == 4
    _one_error_line(capsys.readouterr().err, str(processor), said)


def test_an_encrypted_zip_is_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("model/model.py", (REPO / "model" / "model.py").read_text())
        archive.writestr("model/config.yaml", (REPO / "model" / "config.yaml").read_text())
    data = bytearray(plain.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the flag bits of every entry's headers
        start = data.find(signature)
        while start != -1:
            data[start + offset] |= 0x1  # "encrypted", as zip -P sets it
            start = data.find(signature, start + 4)
    locked = tmp_path / "locked.zip"
    locked.write_bytes(bytes(data))
    assert _run(tmp_path, "--model", str(locked)) == 4
    _one_error_line(capsys.readouterr().err, "is encrypted (password-protected)")


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--std", "1e-300"], "std 1e-300 with mean"),
        (["--batch-size", "99999999999"], "must be <= 65,536"),
        (["--threads", "100000"], "must be <= 1,024"),
        (["--workers", "5000"], "must be <= 1,024"),
        (["--dist-timeout", "nan"], "dist_timeout"),
    ],
)
def test_settings_beyond_reason_are_exit_2(
    tmp_path: Path, options: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, *options) == 2
    _one_error_line(capsys.readouterr().err, said)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU is chosen only where no GPU is visible")
def test_fp16_amp_on_the_cpu_chosen_by_auto_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "--amp", "fp16") == 2
    _one_error_line(capsys.readouterr().err, "--amp fp16 needs a CUDA GPU")


def test_a_yaml_mistake_is_one_line_with_its_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.yaml").write_text("class_name: [\n  a: b\n")
    assert _run(tmp_path, "--model-dir", str(folder)) == 2
    _one_error_line(capsys.readouterr().err, "is not valid YAML at line 3, column 1")


def test_a_state_dict_given_as_the_model_says_how_to_pass_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), weights)
    assert _run(tmp_path, "--model", str(weights)) == 4
    _one_error_line(capsys.readouterr().err, "holds weights only (a state_dict)", f"--checkpoint {weights}")
