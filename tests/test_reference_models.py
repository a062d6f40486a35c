"""The harness against the frameworks' own pipelines, not against our goldens: a timm training checkpoint (its own
and different EMA weights) as timm's create_model(checkpoint_path=...) + create_transform run it, and a tiny
Hugging Face ViT as transformers' processor and model run it, on every sample image and the shipped photos; `harness
check --parity` passing on both and failing on a wrong interpolation; and timm names, tags and checkpoints that are
refused in one line. Nothing downloaded: random weights saved to temporary files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cli import main
from harness.errors import ConfigError
from harness.pipeline.decode import load_rgb
from harness.pipeline.resume import check_identity, record_identity, run_identity
from harness.sources import build_config
from harness.tools.parity import judge
from tests.helpers import REPO, SAMPLES, ids_and_confidences, read_rows, tiny_hf_vit

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.equivalence
TIMM_NAME = "mobilenetv3_small_050"  # small, and its pretrained config resizes bicubic
CLASSES = 10
PHOTOS = REPO / "harness" / "data" / "photos"
COMMON = ["--border", "0", "--progress", "false", "--device", "cpu", "--workers", "0"]
FAST_CHECK = ["--batch-size", "8", "--repeats", "1", "--workers", "0", "--device", "cpu", "--border", "0"]


def _as_timm_opens_it(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every sample image and the shipped JPEG photos in one folder; the harness decodes each as timm's loader
    does (`.convert("RGB")`), so the comparison below is of the pipelines, not of decoders."""
    folder = tmp_path_factory.mktemp("images")
    sources = [p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg")] + sorted(PHOTOS.glob("*.jpg"))
    for path in sources:
        assert np.array_equal(np.asarray(load_rgb(str(path))), np.asarray(_as_timm_opens_it(path))), path
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    assert len(list(folder.iterdir())) >= 20
    return folder


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training checkpoint as timm's train.py saves one: its own weights and EMA weights that differ."""
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=CLASSES)
    with torch.no_grad():  # a random head's probabilities barely move with the image; these move as a trained one's
        model.get_classifier().weight.mul_(30)
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("timm") / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "state_dict_ema": ema}, path)
    return path


def _timm_pipeline(checkpoint: Path, folder: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """timm's own: create_model with the checkpoint (EMA weights, as create_model takes them), its data config's
    eval transform, images opened with .convert("RGB"), softmax."""
    from timm.data import create_transform, resolve_data_config

    if use_ema:
        model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=CLASSES, checkpoint_path=str(checkpoint))
    else:
        model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=CLASSES)
        timm.models.load_checkpoint(model, str(checkpoint), use_ema=False)
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.inference_mode():
        return {p.name: model(transform(_as_timm_opens_it(p)).unsqueeze(0)).softmax(1)[0] for p in folder.iterdir()}


def _assert_same(output: Path, reference: dict[str, torch.Tensor]) -> None:
    """Every image's top-5 are the reference's: the confidences written are its five highest probabilities within
    1e-4, and each id written has that probability there. Two classes within 1e-4 of each other may be written in
    either order (CPU kernel sets round them apart differently: ATEN_CPU_CAPABILITY)."""
    rows = {row[0]: ids_and_confidences(row) for row in read_rows(output)}
    assert sorted(rows) == sorted(reference)
    for key, probs in reference.items():
        got_ids, got_values = rows[key]
        top = probs.topk(5).values.tolist()
        assert max(abs(a - b) for a, b in zip(got_values, top, strict=True)) < 1e-4, key
        assert max(abs(float(probs[i]) - value) for i, value in zip(got_ids, got_values, strict=True)) < 1e-4, key
        assert len(set(got_ids)) == 5, key


@pytest.mark.slow
def test_a_timm_checkpoint_gives_timms_answers_ema_by_default_and_its_own_with_ema_false(
    timm_checkpoint: Path, images: Path, tmp_path: Path, capsys
) -> None:
    model = ["--model", f"timm:{TIMM_NAME}", "--checkpoint", str(timm_checkpoint), *COMMON]
    assert main([str(images), str(tmp_path / "ema.csv"), *model]) == 0
    said = capsys.readouterr().err
    assert said.count("holds its own weights (state_dict) and EMA weights (state_dict_ema): using state_dict_ema") == 1
    _assert_same(tmp_path / "ema.csv", _timm_pipeline(timm_checkpoint, images, use_ema=True))
    assert '"weights": "state_dict_ema"' in (tmp_path / "run.json").read_text()

    assert main([str(images), str(tmp_path / "own.csv"), *model, "--ema", "false"]) == 0
    assert "using state_dict (--ema false)" in capsys.readouterr().err
    _assert_same(tmp_path / "own.csv", _timm_pipeline(timm_checkpoint, images, use_ema=False))


def test_ema_true_needs_ema_weights(timm_checkpoint: Path, tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(timm_checkpoint)["state_dict"], plain)
    argv = [str(PHOTOS), str(tmp_path / "p.csv"), "--model", f"timm:{TIMM_NAME}", "--checkpoint", str(plain)]
    assert main([*argv, "--ema", "true", *COMMON]) == 4
    err = capsys.readouterr().err
    assert "holds no EMA weights" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_the_checkpoints_other_weights(tmp_path: Path) -> None:
    config, output = build_config({}, {}), tmp_path / "p.csv"
    model = {"class": "timm", "source": None, "checkpoint": None, "weights": "state_dict_ema"}
    placed = {"device": "cpu", "batch_size_total": 64, "channels_last": False}
    record_identity(output, run_identity(config, model, [], placed))
    own = run_identity(config, {**model, "weights": "state_dict"}, [], placed)
    with pytest.raises(ConfigError, match='weights: "state_dict_ema" then, "state_dict" now'):
        check_identity(output, own)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_vit(tmp_path_factory.mktemp("hf") / "vit", CLASSES)


def test_a_hugging_face_vit_gives_transformers_answers(hf_folder: Path, images: Path, tmp_path: Path) -> None:
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(hf_folder), local_files_only=True)
    model = transformers.AutoModelForImageClassification.from_pretrained(str(hf_folder), local_files_only=True)
    with torch.inference_mode():
        reference = {
            p.name: model.eval()(**processor(images=_as_timm_opens_it(p), return_tensors="pt")).logits.softmax(-1)[0]
            for p in images.iterdir()
        }
    output = tmp_path / "p.csv"
    assert main([str(images), str(output), "--model", f"hf:{hf_folder}", *COMMON]) == 0
    _assert_same(output, reference)


# ---- harness check --parity ----


def test_check_parity_passes_on_timm_and_fails_on_a_wrong_interpolation(
    timm_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    model = ["--model", f"timm:{TIMM_NAME}", "--checkpoint", str(timm_checkpoint), *FAST_CHECK]
    assert main(["check", "--parity", "--output", str(tmp_path / "right"), *model]) == 0
    out = capsys.readouterr().out
    assert "parity with timm's own pipeline" in out and "interpolation bicubic" in out
    assert out.count("  yes  ") >= 5 and "FAIL" not in out

    assert main(["check", "--parity", "--output", str(tmp_path / "wrong"), *model, "--interpolation", "bilinear"]) == 9
    captured = capsys.readouterr()
    assert "image" in captured.out and "max |dp|" in captured.out and "FAIL" in captured.out
    error = captured.err.strip().splitlines()[-1]
    assert "parity: differs from timm's own pipeline, first at camera.jpg:" in error


def test_check_parity_passes_on_a_hugging_face_folder(hf_folder: Path, tmp_path: Path, capsys) -> None:
    argv = ["check", "--parity", "--output", str(tmp_path / "check"), "--model", f"hf:{hf_folder}", *FAST_CHECK]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "parity with transformers' image processor and model (ViTImageProcessor" in out


def test_top5_ids_may_change_order_only_where_the_reference_ties() -> None:
    theirs = torch.tensor([0.40, 0.20, 0.20004, 0.10, 0.05, 0.04996])
    tied = theirs.clone()
    tied[1] = 0.20006  # ids 1 and 2 swap places: the reference holds them within 1e-4
    assert judge(tied, theirs) == ("yes (tie)", "6.00e-05", "")
    apart = theirs.clone()
    apart[3] = 0.30  # id 3 climbs past ids 1 and 2: no tie excuses that
    top, _, differs = judge(apart, theirs)
    assert top == "no" and differs == "top-5 ids differ (harness 0 3 2 1 4, reference 0 2 1 3 4)"
    assert judge(theirs, theirs + torch.tensor([2e-4, -2e-4, 0, 0, 0, 0]))[2].startswith("probabilities differ by up")


def test_check_parity_needs_a_timm_or_hugging_face_model(tmp_path: Path, capsys) -> None:
    argv = ["check", "--parity", "--output", str(tmp_path / "check"), "--model", str(REPO / "model")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--parity needs a timm (timm:NAME) or Hugging Face model; this is a class model" in err
    assert not (tmp_path / "check").exists()


# ---- timm names, tags and checkpoints refused in one line ----


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_timm_model_without_a_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    line = _refused([str(PHOTOS), str(tmp_path / "p.csv"), "--model", "timm:resnet18"], capsys)
    assert "timm:resnet18 needs its weights: pass --checkpoint FILE (the harness never downloads them)" in line
    assert not (tmp_path / "p.csv").exists()


def test_an_unknown_timm_tag_names_the_models_tags(tmp_path: Path, capsys) -> None:
    line = _refused([str(PHOTOS), str(tmp_path / "p.csv"), "--model", "timm:resnet18.nonexistenttag"], capsys)
    assert "timm has no pretrained config 'nonexistenttag' for resnet18; its tags: a1_in1k" in line


def test_a_misspelt_timm_name_suggests_the_close_ones(tmp_path: Path, capsys) -> None:
    for spelling in ("resnet_18", "ResNet-18"):
        line = _refused([str(PHOTOS), str(tmp_path / "p.csv"), "--model", f"timm:{spelling}"], capsys)
        assert f"timm has no model '{spelling}'; similar names: resnet18, " in line
