"""Whole runs with the real EfficientNet-Lite0 on the real sample images."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import transforms as T

import harness.pipeline.placement
from harness.config import Preprocess
from harness.pipeline.decode import load_rgb
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import DevicePlan
from harness.pipeline.files import ImageFile
from harness.pipeline.loader import ImageDataset
from harness.results.labels import imagenet_to_objectnet
from tests.helpers import OBJECTNET_SAMPLES, REPO, SAMPLES, env_without_build_args, ids_and_confidences

sys.path.insert(0, str(REPO / "model"))
from model import EfficientNetLite0


def test_default_run_writes_objectnet_rows_and_a_report(harness_run, tmp_path: Path) -> None:
    code, rows = harness_run()
    assert code == 0
    assert [row[0] for row in rows] == sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    for row in rows:
        assert len(row) == 11
        ids, confidences = ids_and_confidences(row)
        assert len(set(ids)) == 5 and all(0 <= i <= 312 for i in ids)
        assert all(0 <= c <= 1 for c in confidences) and confidences == sorted(confidences, reverse=True)
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["status"] == "complete" and report["images"] == 19 and report["failures"] == 0
    assert report["label_map"] == "objectnet" and report["model"]["class"] == "EfficientNetLite0"
    assert report["devices"]["device"] == "cpu" and report["config"]["preprocess"]["resize_size"] == 256
    assert report["timings"]["total_s"] > 0
    software = report["software"]
    for name in ("torch", "torchvision", "numpy", "pillow", "pyspng"):
        assert software["packages"][name] == importlib.metadata.version(name)
    assert software["python"] == platform.python_version() and software["torch_cpu_capability"]
    assert (tmp_path / "errors.csv").read_text() == ""
    assert not (tmp_path / "predictions.csv.partial").exists()


def test_mode_zero_gives_imagenet_ids(harness_run) -> None:
    code, rows = harness_run("--convert_outputs_mode", "0")
    top1 = {row[0]: int(row[1]) for row in rows}
    assert code == 0
    assert top1["coffee.png"] == 967  # espresso
    assert top1["chelsea.png"] in (281, 282, 285)  # tabby / tiger cat / Egyptian cat
    assert 652 in ids_and_confidences(next(r for r in rows if r[0] == "grace_hopper.jpg"))[0]  # military uniform


def _template_rows(names: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """The ObjectNet template's own pipeline, written out with torchvision: PIL RGB, crop 2 px, Resize,
    CenterCrop, ToTensor, Normalize, softmax, top-5, each id mapped, unmapped -> -1."""
    mapping = imagenet_to_objectnet()
    transform = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize([127 / 255] * 3, [128 / 255] * 3),
        ]
    )
    batch = []
    for name in names:
        with open(SAMPLES / name, "rb") as f:
            from PIL import Image

            image = Image.open(f).convert("RGB")
        width, height = image.size
        batch.append(transform(image.crop((2, 2, width - 2, height - 2))))
    with torch.no_grad():
        confidence, classes = EfficientNetLite0().eval()(torch.stack(batch)).softmax(1).topk(5, 1)
    return {
        name: ([mapping.get(c, -1) for c in cls], conf)
        for name, cls, conf in zip(names, classes.tolist(), confidence.tolist(), strict=True)
    }


@pytest.mark.equivalence
def test_legacy_map_reproduces_the_template_rows(harness_run) -> None:
    code, rows = harness_run("--label-map", "objectnet-legacy")
    assert code == 0
    expected = _template_rows(OBJECTNET_SAMPLES)  # opaque RGBA, as the template saw them
    for row in rows:
        if row[0] in expected:
            ids, confidences = expected[row[0]]
            assert ids_and_confidences(row)[0] == ids
            assert ids_and_confidences(row)[1] == pytest.approx(confidences, abs=1e-4)
    assert any(-1 in expected[name][0] for name in expected)  # the legacy quirk is really exercised


@pytest.mark.equivalence
def test_positional_and_named_cli_write_identical_files(tmp_path: Path) -> None:
    from harness.cli import main

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert (
        main([str(SAMPLES), str(a), "EfficientNetLite0", "--batch_size", "7", "--workers", "1", "--progress", "false"])
        == 0
    )
    assert (
        main(
            [
                "--input-dir",
                str(SAMPLES),
                "--output-file",
                str(b),
                "--class-name",
                "EfficientNetLite0",
                "--batch-size",
                "7",
                "--workers",
                "1",
                "--progress=false",
            ]
        )
        == 0
    )
    assert a.read_bytes() == b.read_bytes()


def test_softmax_false_writes_logits_with_the_same_ranking(harness_run) -> None:
    _, probabilities = harness_run("--label-map", "none")
    _, logits = harness_run("--label-map", "none", "--softmax", "false", name="logits.csv")
    assert [ids_and_confidences(row)[0] for row in probabilities] == [ids_and_confidences(row)[0] for row in logits]
    assert any(x > 1 for row in logits for x in ids_and_confidences(row)[1])


def test_environment_and_cli_precedence_in_a_real_run(harness_run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BATCH_SIZE", "3")
    monkeypatch.setenv("WORKERS", "1")
    assert harness_run()[0] == 0
    assert json.loads((tmp_path / "run.json").read_text())["batch_size_total"] == 3
    assert harness_run("--batch_size", "5", "--workers", "0")[0] == 0
    report = json.loads((tmp_path / "run.json").read_text())
    assert (report["batch_size_total"], report["workers"]) == (5, 0)


def test_data_parallel_is_built_once_for_the_whole_run(harness_run, monkeypatch) -> None:
    """Two 'GPUs' on the CPU: DataParallel degrades to a pass-through without CUDA, so the wrapping is real."""
    built = []

    class CountingDataParallel(nn.DataParallel):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("device_ids"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(
        harness.pipeline.placement, "plan_devices", lambda config: DevicePlan(torch.device("cpu"), [0, 1])
    )
    monkeypatch.setattr(nn, "DataParallel", CountingDataParallel)
    code, rows = harness_run("--batch_size", "2", "--workers", "0")  # 19 images in batches of 4: 5 batches
    assert code == 0 and len(rows) == 19
    assert built == [[0, 1]]


def test_red_frame_is_gone_before_resizing() -> None:
    """With the template geometry the crop keeps the image's top rows, so a surviving frame would show."""
    name = OBJECTNET_SAMPLES[0]

    def top_row_red_share(border: int) -> float:
        dataset = ImageDataset([ImageFile(str(SAMPLES / name), name)], Decoding(Preprocess(border=border)))
        _, tensor, error, _ = dataset[0]
        assert error == ""
        r, g, b = tensor[:, 0, :].int()
        return float(((r > 150) & (g < 80) & (b < 80)).float().mean())

    assert load_rgb(str(SAMPLES / name)).size == (484, 274)
    assert top_row_red_share(0) > 0.9
    assert top_row_red_share(2) < 0.05


def _cli(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=env_without_build_args(), timeout=300
    )


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        ([], 3, "input folder /input does not exist"),
        (["sample-images", "{tmp}/o.csv", "NoSuchNet"], 2, "config.yaml was written for class EfficientNetLite0"),
        (["sample-images", "{tmp}/o.csv", "--gpus", "2"], 5, "no CUDA GPU is visible"),
        (["sample-images", "{tmp}/o.csv", "--batch_size", "-1"], 2, "batch_size='-1' is not valid"),
        (["sample-images", "{tmp}/o.csv", "--no-such-option"], 2, "unrecognized arguments"),
        (["{tmp}", "{tmp}/o.csv"], 3, "no images in"),
        (["sample-images", "{tmp}"], 6, "is a folder"),
    ],
)
def test_user_mistakes_give_one_clear_line_and_an_exit_code(tmp_path: Path, argv, code, message) -> None:
    result = _cli("entrypoint.py", *[a.format(tmp=tmp_path) for a in argv])
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_entrypoint_module_and_script_expose_the_same_cli(tmp_path: Path) -> None:
    helps = [_cli(*prefix, "--help").stdout for prefix in (["entrypoint.py"], ["-m", "harness"])]
    script = subprocess.run(["harness", "--help"], capture_output=True, text=True, cwd=REPO)
    assert helps[0] == helps[1] == script.stdout
    for option in (
        "--device",
        "--topk",
        "--label-map",
        "--border",
        "--amp",
        "--softmax",
        "--convert_outputs_mode",
        "--batch_size",
        "--workers",
        "--gpus",
        "IMAGES_DIR",
        "exit codes",
    ):
        assert option in helps[0]
    result = _cli("-m", "harness", "run", "sample-images", str(tmp_path / "m.csv"), "--progress", "false")
    assert result.returncode == 0 and "19 images, 0 failed" in result.stdout
    assert "model EfficientNetLite0 (1000 classes), cpu" in result.stderr
