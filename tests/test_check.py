"""`harness check`: the preprocessing audit's variants and rule, judging answers through a label map, the preview's
reading of the model's input, a whole check of a tiny model, and whole checks of the real model on the real photos
(passing as configured, failing with BGR or a value scale of 1, on ObjectNet images with the answers JSON, and the
page drawn by a real browser)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cli import main
from harness.config import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from harness.errors import ToolFileError
from harness.pipeline.devices import DeviceNormalizer
from harness.pipeline.files import ImageFile
from harness.pipeline.transforms import geometry
from harness.results.labels import ObjectNetSummed, class_ids, imagenet_to_objectnet, objectnet_names
from harness.results.report import describe_preprocessing
from harness.sources import build_config
from harness.tools.audit import MARGIN, Judge, Tally, beats_clearly, log_probabilities, variants
from harness.tools.check import read_answers, seconds_per_image
from harness.tools.preview import ORIGINAL_BOX, PAD, standard_view
from tests.helpers import OBJECTNET_SAMPLES, REPO, SAMPLES, shared_file

PHOTOS = REPO / "harness" / "data" / "photos"
EXAMPLE = build_config({}, {}).preprocess  # model/config.yaml's: RGB, 0..255, (x - 127) / 128
FAST = ["--batch-size", "8", "--repeats", "1", "--workers", "0"]


# ---- the variants and the rule ----


def test_each_variant_changes_one_setting_to_the_mistake_people_make() -> None:
    found = {variant.setting: variant for variant in variants(EXAMPLE)}
    assert [(v.setting, v.value) for v in found.values()] == [
        ("channel_order", "bgr"),
        ("value_scale", "1"),
        ("mean/std", "none"),
        ("border", "0"),
    ]
    # the other value scale keeps mean and std as they are: rescaling them would send the model the same numbers
    assert found["value_scale"].pre == dataclasses.replace(EXAMPLE, value_scale=1.0)
    assert found["mean/std"].pre == dataclasses.replace(EXAMPLE, mean=None, std=None)
    assert found["border"].pre == dataclasses.replace(EXAMPLE, border=0)


def test_variants_of_the_aisafety_contract_turn_normalisation_on_in_its_units_and_order() -> None:
    contract = Preprocess(channel_order="bgr", value_scale=1.0, mean=None, std=None, border=0)
    found = {variant.setting: variant for variant in variants(contract)}
    assert found["channel_order"].value == "rgb" and found["value_scale"].value == "255"
    assert found["border"].pre.border == 2
    assert found["mean/std"].pre.mean == IMAGENET_MEAN[::-1] and found["mean/std"].pre.std == IMAGENET_STD[::-1]
    scaled = {v.setting: v for v in variants(dataclasses.replace(contract, value_scale=255.0))}["mean/std"]
    assert scaled.pre.mean == pytest.approx([m * 255 for m in IMAGENET_MEAN[::-1]])
    assert scaled.advice == "mean: [103.53, 116.28, 123.675] and std: [57.375, 57.12, 58.395]"


def _tally(top1: list[bool], log_probs: list[float]) -> Tally:
    return Tally(tuple(top1), tuple(log_probs))


def test_a_variant_beats_clearly_only_by_margin_without_losing_top1_on_more_images() -> None:
    configured = _tally([True, True, False, False], [-0.1, -0.2, -2.0, -2.0])
    assert beats_clearly(_tally([True, True, True, False], [-0.1, -0.1, -1.5, -1.9]), configured)
    # below the margin
    small = MARGIN * 4 - 0.01
    assert not beats_clearly(_tally([True, True, True, False], [-0.1, -0.2, -2.0 + small, -2.0]), configured)
    # a top-1 lost, whatever the confidence gained
    assert not beats_clearly(_tally([True, False, False, False], [-0.1, -0.8, -0.5, -0.5]), configured)
    # the mean carried by one image while the others get worse
    assert not beats_clearly(_tally([True, True, True, False], [-0.2, -0.3, -0.2, -2.1]), configured)


def test_answers_in_objectnet_ids_are_judged_through_the_label_map() -> None:
    """Top-1 is the map's first id; the true label's probability is that of every ImageNet class written as it."""
    mapping = imagenet_to_objectnet()
    shared_target = next(t for t in set(mapping.values()) if list(mapping.values()).count(t) > 1)
    members = [c for c, t in mapping.items() if t == shared_target]
    other = next(c for c, t in mapping.items() if t != shared_target)
    label_map = ObjectNetSummed(5, softmax=True)
    files = [ImageFile("/x/a.png", "a.png"), ImageFile("/x/b.png", "sub/b.png"), ImageFile("/x/c.png", "c.png")]
    answers = {"a.png": frozenset({str(shared_target)}), "b.png": frozenset({str(mapping[other])})}
    judge = Judge.of(label_map, class_ids(label_map, 1000), files, answers)
    assert judge.indices == [0, 1]  # c.png has no answer
    logits = torch.zeros(3, 1000)
    logits[:, members] = 3.0  # the shared class wins by its summed probability on every image
    logits[:, other] = 3.5  # though one ImageNet class of another is the single largest
    tally = judge.tally(logits)
    probabilities = logits.softmax(1)
    assert tally.top1 == (True, False)
    assert tally.log_probs == pytest.approx(
        [float(probabilities[0, members].sum().log()), float(probabilities[1, other].log())], abs=1e-5
    )
    assert judge.tally(logits, skip=frozenset({0})).top1 == (False,)


def test_outputs_are_read_as_logits_unless_they_are_probabilities_already() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.allclose(log_probabilities(logits), logits.log_softmax(1))
    probabilities = logits.softmax(1)  # a model that applies softmax itself
    assert torch.allclose(log_probabilities(probabilities), probabilities.log())


def test_answers_read_from_the_objectnet_json_and_a_csv(tmp_path: Path) -> None:
    official = read_answers(shared_file("objectnet-mappings", "answers", "answers-test.json"))
    assert len(official) == 10 and official["42d42cf4b12b41c.png"] == frozenset({"75"})
    table = tmp_path / "answers.csv"
    table.write_text("sub/a.png,75\nb.png,tabby\n")
    assert read_answers(table) == {"a.png": frozenset({"75"}), "b.png": frozenset({"tabby"})}
    table.write_text("a.png,75,extra\n")
    with pytest.raises(ToolFileError, match="line 1: expected key,label"):
        read_answers(table)
    bad = tmp_path / "answers.json"
    bad.write_text(json.dumps({"a.png": {"id": 75}}))
    with pytest.raises(ToolFileError, match=r"the answer for a\.png must be a label"):
        read_answers(bad)


def test_answers_need_the_images_they_answer(tmp_path: Path, capsys) -> None:
    assert main(["check", "--answers", str(tmp_path / "a.json"), "--output", str(tmp_path)]) == 2
    assert "--answers needs --images" in capsys.readouterr().err


def test_answers_that_name_none_of_the_images_are_exit_9(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLES / "coffee.png", images / "coffee.png")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"someone_else.png": "banana"}))
    out = tmp_path / "out"
    assert main(["check", "--images", str(images), "--answers", str(answers), "--output", str(out), *FAST]) == 9
    assert "names none of the 1 images" in capsys.readouterr().err
    assert not (out / "predictions.csv").exists()


def test_time_per_image_adds_up_on_the_cpu_and_overlaps_on_a_gpu() -> None:
    assert seconds_per_image(0.02, 0.01, "cpu", workers=2, cpus=2) == pytest.approx(0.025)
    assert seconds_per_image(0.02, 0.01, "cpu", workers=0, cpus=2) == pytest.approx(0.03)
    assert seconds_per_image(0.002, 0.01, "cuda", workers=4, cpus=16) == pytest.approx(0.0025)
    assert seconds_per_image(0.004, 0.01, "cuda", workers=4, cpus=16) == pytest.approx(0.004)


# ---- the preview's reading of the model's input ----


def test_the_default_preprocessing_reads_back_as_the_photo_and_the_examples_with_half_the_contrast() -> None:
    crop = geometry(Image.open(PHOTOS / "coffee.jpg").convert("RGB"), Preprocess())
    batch = torch.from_numpy(crop).unsqueeze(0)
    default = DeviceNormalizer(Preprocess(), torch.device("cpu"), torch.float32, False)(batch)[0]
    assert np.abs(standard_view(default).astype(int) - crop.transpose(1, 2, 0)).max() <= 1
    example = standard_view(DeviceNormalizer(EXAMPLE, torch.device("cpu"), torch.float32, False)(batch)[0])
    contrast = [example[..., c].std() / crop[c].std() for c in range(3)]  # 255 x std / 128: about 0.45
    assert contrast == pytest.approx([255 * s / 128 for s in IMAGENET_STD], abs=0.01)
    bgr = dataclasses.replace(Preprocess(), channel_order="bgr")
    swapped = DeviceNormalizer(bgr, torch.device("cpu"), torch.float32, False)(batch)[0]
    assert np.abs(standard_view(swapped).astype(int) - crop[::-1].transpose(1, 2, 0)).max() <= 1  # blue for red


# ---- a whole check in seconds: a tiny model ----


def test_a_model_the_photos_cannot_judge_and_an_unreadable_image_are_said_not_failed(tmp_path: Path, capsys) -> None:
    """A four-class model on two photos and a broken file: the run and the preview still come, the broken file is
    a warning with its reason, and with no answers there is nothing to audit."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.py").write_text(
        "from torch import nn\n\n\nclass Model(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(3, 4)\n\n    def forward(self, x):\n        return self.fc(x.mean((2, 3)))\n"
    )
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(PHOTOS / "coffee.jpg", images)
    shutil.copy(PHOTOS / "camera.jpg", images)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    argv = ["check", "--model-dir", str(model), "--images", str(images), "--output", str(out), *FAST]
    assert main([*argv, "--max-failures", "1"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^failed images\s+warn\s+1 of 3: broken.png: UnidentifiedImageError", table, re.MULTILINE)
    assert re.search(r"^preprocessing\s+skip\s+no answers to judge by", table, re.MULTILINE)
    assert re.search(r"^label map\s+info\s+none: the model's own class ids \(4 classes\)", table, re.MULTILINE)
    assert "not an ObjectNet top-5 file" in table and (out / "preview.png").is_file()
    page = (out / "preview.html").read_text()
    assert "<h3>broken.png</h3>" in page and "UnidentifiedImageError" in page
    assert main(["check", "--model-dir", str(model), "--output", str(out), *FAST]) == 0
    assert "the photos are labelled in ImageNet's 1000 classes, the model has 4" in capsys.readouterr().out


# ---- whole checks of the real model on the real photos ----


@pytest.fixture
def seen_inputs() -> Iterator[list[torch.Tensor]]:
    """Every input the example model is called with, as it received it."""
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple) -> None:
        if type(module).__name__ == "EfficientNetLite0":
            captured.append(args[0].detach().float().cpu().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(keep)
    yield captured
    handle.remove()


def _expected_tile(model_input: torch.Tensor) -> np.ndarray:
    """preview.py's docstring's reading, written out again."""
    values = model_input.double().numpy()
    rgb = [255 * (values[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c]) for c in range(3)]
    return np.rint(np.clip(np.stack(rgb, axis=-1), 0, 255)).astype(int)


def _find_tile(sheet: np.ndarray, tile: np.ndarray) -> int:
    """The row of `sheet` where `tile` stands in the column of model inputs (within one level), or -1."""
    left = PAD + ORIGINAL_BOX + PAD
    side = tile.shape[0]
    column = sheet[:, left : left + side].astype(int)
    for top in np.flatnonzero(np.abs(column - tile[0]).max(axis=(1, 2)) <= 1):
        if top + side <= len(sheet) and np.abs(column[top : top + side] - tile).max() <= 1:
            return int(top)
    return -1


@pytest.mark.slow  # one whole check: about 10 s on two busy cores
def test_the_example_model_passes_and_preview_shows_the_tensor_it_saw(
    tmp_path: Path, capsys, seen_inputs: list[torch.Tensor]
) -> None:
    assert main(["check", "--output", str(tmp_path), "--batch-size", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0]  # the verdicts; the audit's table follows
    verdicts = dict(re.findall(r"^(run|failed images|preprocessing|model size)\s+(\w+)", table, re.MULTILINE))
    assert verdicts == {"run": "pass", "failed images": "pass", "preprocessing": "pass", "model size": "pass"}
    assert "4,652,008 parameters" in out and "50,000 images: about" in out
    assert re.search(r"^configured\s+4/5\s+-0\.5\d\d", out, re.MULTILINE)
    assert {p.name for p in tmp_path.iterdir()} >= {"predictions.csv", "errors.csv", "preview.png", "preview.html"}

    run_batch = next(batch for batch in seen_inputs if len(batch) == 5)  # the run's one batch of the five photos
    sheet = np.asarray(Image.open(tmp_path / "preview.png").convert("RGB"))
    tops = [_find_tile(sheet, _expected_tile(model_input)) for model_input in run_batch]
    assert -1 not in tops and tops == sorted(tops)  # every photo's, in order


@pytest.mark.slow  # two whole checks
@pytest.mark.parametrize(
    ("option", "named"),
    [
        (["--channel-order", "bgr"], "channel_order rgb does clearly better than the configured bgr"),
        (["--value-scale", "1"], "value_scale 255 does clearly better than the configured 1"),
    ],
)
def test_a_preprocessing_mistake_fails_naming_the_setting_and_the_better_value(
    tmp_path: Path, capsys, option: list[str], named: str
) -> None:
    assert main(["check", "--output", str(tmp_path), *FAST, *option]) == 9
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("harness: error: check failed: preprocessing: " + named)
    setting, value = named.split()[:2]
    assert f"set {setting}: {value} in model/config.yaml" in error


@pytest.mark.slow  # one whole check
def test_objectnet_images_are_judged_by_the_answers_json_in_objectnet_ids(tmp_path: Path, capsys) -> None:
    answers = shared_file("objectnet-mappings", "answers", "answers-test.json")
    images = tmp_path / "images"
    images.mkdir()
    for name in OBJECTNET_SAMPLES:
        shutil.copy(SAMPLES / name, images / name)
    code = main(["check", "--images", str(images), "--answers", str(answers), "--output", str(tmp_path / "out"), *FAST])
    out = capsys.readouterr().out
    in_overlap = [k for k, v in json.loads(answers.read_text()).items() if v in set(imagenet_to_objectnet().values())]
    assert f"preprocessing audit: {len(in_overlap)} of 10 images judged, in the ids the CSV holds" in out
    assert code == 0 and re.search(r"^run\s+pass .*validate's rules hold", out, re.MULTILINE)
    page = (tmp_path / "out" / "preview.html").read_text()
    name = objectnet_names()[json.loads(answers.read_text())[in_overlap[0]]]
    assert f"true: {json.loads(answers.read_text())[in_overlap[0]]} {name}" in page


def _without_images(page: str) -> str:
    """The page with every picture replaced by a transparent one of the same size: the layout stays put."""
    buffer = io.BytesIO()
    Image.new("RGBA", (1, 1), (0, 0, 0, 0)).save(buffer, "PNG")
    blank = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return re.sub(r'src="data:image/png;base64,[^"]*"', f'src="{blank}"', page)


def _screenshot(page: Path, shot: Path) -> np.ndarray:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += ["--force-device-scale-factor=1", "--window-size=1100,2600", f"--screenshot={shot}", page.as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


@pytest.mark.slow  # a whole check and two browser screenshots
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium")
def test_a_real_browser_draws_the_pages_images(tmp_path: Path) -> None:
    """Chromium's screenshot of preview.html against one of the same page with blank pictures: they differ exactly
    where the pictures go, over their whole area, and there the colours are the pictures' own."""
    out = tmp_path / "out"
    assert main(["check", "--output", str(out), *FAST]) == 0
    page = out / "preview.html"
    blank = tmp_path / "blank.html"
    blank.write_text(_without_images(page.read_text()))
    drawn, empty = _screenshot(page, tmp_path / "page.png"), _screenshot(blank, tmp_path / "blank.png")
    pictures = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
        for data in re.findall(r'src="data:image/png;base64,([^"]*)"', page.read_text())
    ]
    assert len(pictures) == 10  # an original and a model input for each of the five photos
    differs = (drawn != empty).any(axis=2)
    area = sum(p.shape[0] * p.shape[1] for p in pictures)
    assert 0.9 * area <= differs.sum() <= area
    expected = sum(p.reshape(-1, 3).sum(axis=0) for p in pictures) / area
    assert np.abs(drawn[differs].mean(axis=0) - expected).max() < 4
    assert (empty != 255).any(axis=2).sum() > 10_000  # the text and tables are drawn too


def test_the_preprocessing_line_names_the_resize_and_the_crop() -> None:
    shorter = Preprocess(resize_size=256, interpolation="bicubic")
    line = describe_preprocessing(shorter)
    assert line.startswith("border 2, shorter side to 256 (bicubic), centre crop 224,")
    squash = Preprocess(resize_size=224, resize_mode="squash", crop_offset="floor")
    assert "both sides to 224 (bilinear), no crop," in describe_preprocessing(squash)
    floor = Preprocess(resize_size=256, crop_offset="floor")
    assert "centre crop 224 (offset floor)," in describe_preprocessing(floor)
