"""What a run tells its user as it starts: the preprocessing as it really runs and where each value came from, a
hint when ordinary photos are treated as ObjectNet's, and ImageNet's class names as a label map."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from harness.cli import main
from tests.helpers import REPO, SAMPLES, read_rows

PHOTOS = sorted(p for p in SAMPLES.iterdir() if p.suffix == ".jpg")


def _run(tmp_path: Path, capsys, *options: str, images: Path = SAMPLES) -> tuple[int, list[str], dict]:
    output = tmp_path / "out" / "p.csv"
    code = main([str(images), str(output), "--progress", "false", *options])
    lines = capsys.readouterr().err.strip().splitlines()
    run = json.loads(output.with_name("run.json").read_text()) if output.with_name("run.json").exists() else {}
    return code, lines, run


def _photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, folder)
    return folder


def test_the_start_up_line_shows_the_preprocessing_and_where_it_came_from(tmp_path: Path, capsys) -> None:
    code, lines, run = _run(tmp_path, capsys, "--input-size", "200", "--resize-size", "228")
    assert code == 0
    said = next(line for line in lines if line.startswith("harness: preprocessing: "))
    assert "border 2, shorter side to 228 (bicubic), centre crop 200, RGB, values 0..255, mean 127" in said
    assert said.endswith("(from model/config.yaml; input_size from command line; resize_size from command line)")
    assert run["preprocessing"]["settings_from"]["interpolation"] == "model/config.yaml"
    assert run["preprocessing"]["settings_from"]["crop_offset"] == "default"


def _three_channel_model(tmp_path: Path) -> Path:
    """A model folder whose model answers with its input's three channel means: any preprocessing runs it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(
        "import torch\n\nclass Model(torch.nn.Module):\n    def forward(self, x):\n        return x.mean((2, 3))\n"
    )
    return folder


def test_defaults_are_said_to_be_defaults(tmp_path: Path, capsys) -> None:
    folder = _three_channel_model(tmp_path)
    code, lines, run = _run(tmp_path, capsys, "--model-dir", str(folder), "--topk", "3")
    assert code == 0
    assert "(the harness's defaults, torchvision's ImageNet recipe: set your model's in model/config.yaml)" in (
        next(line for line in lines if line.startswith("harness: preprocessing: "))
    )
    assert set(run["preprocessing"]["settings_from"].values()) == {"default"}


def test_a_model_folders_own_transform_is_named_as_what_runs(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    shutil.copytree(REPO / "model", folder)
    (folder / "data_transform_description.py").write_text(
        textwrap.dedent(
            """
            import torchvision.transforms as T

            class data_transform:
                def getTransform(self):
                    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
            """
        )
    )
    code, lines, run = _run(tmp_path, capsys, "--model-dir", str(folder), "--head-start", "false")
    assert code == 0
    shown = str(folder / "data_transform_description.py")
    assert run["preprocessing"]["as_run"] == f"{shown} (the template's transform hook), after stripping a 2 px frame"
    assert run["preprocessing"]["from"] == shown
    assert any(line.startswith(f"harness: preprocessing: {shown}") for line in lines)


def test_ordinary_photos_get_one_hint_and_objectnet_images_none(tmp_path: Path, capsys) -> None:
    photos = _photos(tmp_path)
    code, lines, _ = _run(tmp_path, capsys, images=photos)
    assert code == 0
    hints = [line for line in lines if line.startswith("harness: hint: ")]
    assert hints == [
        "harness: hint: china.jpg has no frame like ObjectNet's images: if these are other photos, --border 0 keeps "
        "their edges (the run strips 2 px); --label-map imagenet-names writes ImageNet class names, not ObjectNet ids"
    ]
    code, lines, _ = _run(tmp_path, capsys, "--border", "0", "--label-map", "imagenet-names", images=photos)
    assert code == 0 and not [line for line in lines if "hint" in line]
    code, lines, _ = _run(tmp_path, capsys)  # the samples begin with ObjectNet's framed images
    assert code == 0 and not [line for line in lines if "hint" in line]


def test_imagenet_names_label_a_photo_with_its_class(tmp_path: Path, capsys) -> None:
    photos = _photos(tmp_path)
    code, _, run = _run(tmp_path, capsys, "--label-map", "imagenet-names", "--border", "0", images=photos)
    assert code == 0 and run["label_map"] == "imagenet-names"
    rows = {row[0]: row[1:] for row in read_rows(tmp_path / "out" / "p.csv")}
    assert "military uniform" in rows["grace_hopper.jpg"][::2] and rows["flower.jpg"][0] == "daisy"
    assert all(not field.lstrip("-").isdigit() for row in rows.values() for field in row[::2])


def test_imagenet_names_need_an_imagenet_head(tmp_path: Path, capsys) -> None:
    folder = _three_channel_model(tmp_path)
    code, lines, _ = _run(tmp_path, capsys, "--model-dir", str(folder), "--label-map", "imagenet-names")
    assert code == 2
    assert lines[-1].startswith("harness: error: label map imagenet-names names a 1000-class ImageNet head's")
