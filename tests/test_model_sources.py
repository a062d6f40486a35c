"""Every model a participant brings, pinned against the libraries' own forward passes: a timm training checkpoint
(by name and through a model.py class, EMA weights too), a Hugging Face folder saved with save_pretrained, an
exported ONNX file run alone, and safetensors; nothing downloaded."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.pipeline.decode import load_rgb
from tests.helpers import REPO, SAMPLES, compare_predictions, ids_and_confidences, read_rows, tiny_hf_vit

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.equivalence  # outputs pinned against a reference: run again under other CPU kernels
IMAGES = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))


def _rows(path: Path) -> dict[str, list[str]]:
    return {row[0]: ids_and_confidences(row) for row in read_rows(path)}


def _assert_matches(
    rows: dict[str, tuple[list[int], list[float]]], reference: dict[str, torch.Tensor], tolerance: float, k: int
) -> None:
    """Each image's top-k ids equal the reference's, their probabilities within `tolerance`."""
    assert sorted(rows) == sorted(reference)
    for key, probs in reference.items():
        values, ids = probs.topk(k)
        row_ids, confidences = rows[key]
        assert row_ids == ids.tolist(), key
        assert max(abs(a - b) for a, b in zip(confidences, values.tolist(), strict=True)) < tolerance, key


# ---- timm ----


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """resnet18 with 10 classes, seeded, saved by timm's own CheckpointSaver with EMA weights that differ."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    ema = ModelEmaV3(model)
    with torch.no_grad():
        for parameter in ema.module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="resnet18", num_classes=10, lr=0.1, epochs=40)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=37, metric=0.5)
    checkpoint = next(folder.glob("checkpoint-37.pth.tar"))
    assert "args" in torch.load(checkpoint, weights_only=False)  # as the OOD-CV winners' files are
    return checkpoint, model, ema.module.eval()


def _timm_reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's own eval transform and forward; images decoded as the harness decodes them (transparency on white)."""
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(model))
    with torch.inference_mode():
        return {p.name: model(transform(load_rgb(str(p))).unsqueeze(0)).softmax(1)[0] for p in IMAGES}


def test_a_timm_training_checkpoint_runs_by_name_and_equals_timms_forward(timm_checkpoint, tmp_path: Path) -> None:
    """As timm's create_model(checkpoint_path=...) loads it: its EMA weights, since it holds them."""
    checkpoint, _, ema = timm_checkpoint
    output = tmp_path / "p.csv"
    common = ["--checkpoint", str(checkpoint), "--border", "0", "--progress", "false", "--device", "cpu"]
    assert main([str(SAMPLES), str(output), "--model", "timm:resnet18", *common]) == 0
    _assert_matches(_rows(output), _timm_reference(ema), 1e-4, 5)
    run = (output.parent / "run.json").read_text()
    assert '"classes": 10' in run and '"crop_pct": 0.95' in run and '"interpolation": "bicubic"' in run
    assert "shorter side to 235 (bicubic), centre crop 224" in run and "from timm's pretrained config" in run
    assert '"weights": "state_dict_ema"' in run


def test_a_timm_models_resize_follows_a_new_input_size_as_timms_does(timm_checkpoint, tmp_path: Path) -> None:
    """--input-size 299 on resnet18 (crop_pct 0.95): timm resizes to floor(299 / 0.95) = 314, then crops 299."""
    from timm.data import create_transform, resolve_data_config

    checkpoint, model, _ = timm_checkpoint
    reference = create_transform(**resolve_data_config({"input_size": (3, 299, 299)}, model=model)).transforms[0]
    output = tmp_path / "p.csv"
    argv = ["--model", "timm:resnet18", "--checkpoint", str(checkpoint), "--input-size", "299", "--progress", "false"]
    assert main([str(SAMPLES), str(output), *argv]) == 0
    preprocessing = json.loads((tmp_path / "run.json").read_text())["preprocessing"]
    assert f"shorter side to {reference.size} (bicubic), centre crop 299" in preprocessing["as_run"]
    assert preprocessing["settings_from"]["input_size"] == "command line"


@pytest.mark.slow
def test_ema_true_and_false_choose(timm_checkpoint, tmp_path: Path) -> None:
    checkpoint, model, ema = timm_checkpoint
    output = tmp_path / "p.csv"
    options = ["--model", "timm:resnet18", "--checkpoint", str(checkpoint), "--border", "0", "--progress", "false"]
    assert main([str(SAMPLES), str(output), *options, "--ema"]) == 0
    _assert_matches(_rows(output), _timm_reference(ema), 1e-4, 5)
    plain = _rows_of_plain(checkpoint, tmp_path)
    _assert_matches(plain, _timm_reference(model), 1e-4, 5)
    assert _rows(output) != plain


def _rows_of_plain(checkpoint: Path, tmp_path: Path) -> dict[str, list[str]]:
    """The checkpoint's own weights (`--ema false`)."""
    output = tmp_path / "plain.csv"
    options = ["--model", "timm:resnet18", "--checkpoint", str(checkpoint), "--border", "0", "--progress", "false"]
    assert main([str(SAMPLES), str(output), *options, "--ema", "false"]) == 0
    return _rows(output)


TIMM_CLASS = """import timm
from timm.models.resnet import BasicBlock


class Model(timm.models.ResNet):
    def __init__(self):
        super().__init__(block=BasicBlock, layers=[2, 2, 2, 2], num_classes=10)
"""
TIMM_YAML = """checkpoint: {checkpoint}
preprocess:
  border: 0
  input_size: 224
  resize_size: 235
  interpolation: bicubic
"""


def test_the_same_checkpoint_through_a_model_py_class(timm_checkpoint, tmp_path: Path) -> None:
    """The same rule for a class of one's own: the file's EMA weights, as timm would load them."""
    checkpoint, _, model = timm_checkpoint
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(TIMM_CLASS)
    shutil.copy(checkpoint, folder / "weights.pth.tar")  # a model folder's config names files inside it
    (folder / "config.yaml").write_text(TIMM_YAML.format(checkpoint="weights.pth.tar"))
    output = tmp_path / "p.csv"
    assert main([str(SAMPLES), str(output), "--model", str(folder), "--progress", "false"]) == 0
    _assert_matches(_rows(output), _timm_reference(model), 1e-4, 5)


class Smuggled:
    """Any class but argparse.Namespace: unpickling it could run code."""


def test_a_checkpoint_with_any_other_pickled_class_is_still_refused(timm_checkpoint, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "ckpt.pth"
    saved = torch.load(timm_checkpoint[0], weights_only=False)
    torch.save({**saved, "extra": Smuggled()}, checkpoint)
    argv = [str(SAMPLES), str(tmp_path / "p.csv"), "--model", "timm:resnet18", "--checkpoint", str(checkpoint)]
    assert main(argv) == 4
    assert f"{__name__}.Smuggled" in capsys.readouterr().err


def test_ema_without_ema_weights_and_an_unknown_timm_name_are_clear(timm_checkpoint, tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain.pth"
    torch.save(timm_checkpoint[1].state_dict(), plain)
    argv = [str(SAMPLES), str(tmp_path / "p.csv"), "--model", "timm:resnet18", "--checkpoint", str(plain), "--ema"]
    assert main(argv) == 4 and "holds no EMA weights" in capsys.readouterr().err
    assert main([str(SAMPLES), str(tmp_path / "p.csv"), "--model", "timm:resnet_eighteen"]) == 4
    assert "timm has no model 'resnet_eighteen'" in capsys.readouterr().err


def test_safetensors_checkpoints_load(timm_checkpoint, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    checkpoint, model, _ = timm_checkpoint
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    output = tmp_path / "p.csv"
    options = ["--model", "timm:resnet18", "--checkpoint", str(weights), "--border", "0", "--progress", "false"]
    assert main([str(SAMPLES), str(output), *options]) == 0
    assert _rows(output) == _rows_of_plain(checkpoint, tmp_path)


# ---- Hugging Face ----


def _hf_folder(tmp_path: Path, kind: str) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "convnext":
        config = transformers.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10
        )
        model = transformers.ConvNextForImageClassification(config)
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    else:
        return tiny_hf_vit(tmp_path / kind)
    folder = tmp_path / kind
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _hf_reference(folder: Path) -> dict[str, torch.Tensor]:
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.inference_mode():
        return {
            p.name: model(**processor(images=load_rgb(str(p)), return_tensors="pt")).logits.softmax(1)[0]
            for p in IMAGES
        }


@pytest.mark.parametrize("kind", ["convnext", "vit"])
def test_a_hugging_face_folder_equals_transformers_own_processor_and_model(tmp_path: Path, kind: str) -> None:
    folder = _hf_folder(tmp_path, kind)
    reference = _hf_reference(folder)
    for spec in (f"hf:{folder}", str(folder)):  # named, and found from its config.json
        output = tmp_path / "p.csv"
        assert main([str(SAMPLES), str(output), "--model", spec, "--border", "0", "--progress", "false"]) == 0
        rows = _rows(output)
        for key, probs in reference.items():
            row_ids, confidences = rows[key]
            assert row_ids[0] == int(probs.argmax()), (spec, key)
            for class_id, confidence in zip(row_ids, confidences, strict=True):
                assert abs(confidence - float(probs[class_id])) < 1e-3, (spec, key)


def _named_hf_folder(tmp_path: Path) -> Path:
    """The tiny ViT with class names of its own ("kind 0" .. "kind 9") in its config.json."""
    folder = _hf_folder(tmp_path, "vit")
    config_path = folder / "config.json"
    text = config_path.read_text()
    for i in range(10):
        text = text.replace(f'"LABEL_{i}"', f'"kind {i}"')
    config_path.write_text(text)
    return folder


def test_hugging_face_class_names_are_written(tmp_path: Path) -> None:
    folder = _named_hf_folder(tmp_path)
    output = tmp_path / "p.csv"
    assert main([str(SAMPLES), str(output), "--model", str(folder), "--progress", "false"]) == 0
    assert all(row[1].startswith("kind ") for row in read_rows(output))


def test_an_exported_onnx_file_carries_its_class_names(tmp_path: Path) -> None:
    """Its metadata's `labels` are the model's names, not a setting: the file alone writes them."""
    pytest.importorskip("onnx")
    folder = _named_hf_folder(tmp_path)
    exported = tmp_path / "alone" / "vit.onnx"
    exported.parent.mkdir()
    assert main(["export-onnx", "--model", str(folder), "--output", str(exported), "--images", str(SAMPLES)]) == 0
    output = tmp_path / "p.csv"
    assert main([str(SAMPLES), str(output), "--model", str(exported), "--progress", "false"]) == 0
    assert all(row[1].startswith("kind ") for row in read_rows(output))


# ---- one ONNX file ----


@pytest.mark.slow
def test_the_exported_onnx_file_alone_reproduces_the_pytorch_run(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    exported = tmp_path / "alone" / "lite0.onnx"
    exported.parent.mkdir()
    assert main(["export-onnx", "--output", str(exported)]) == 0
    output = tmp_path / "p.csv"
    assert main([str(SAMPLES), str(output), "--model", str(exported), "--progress", "false"]) == 0
    problems = compare_predictions(REPO / "tests" / "golden" / "sample-images.csv", output, tolerance=1e-4)
    assert not problems, "\n".join(problems)
    shutil.copy(exported, tmp_path / "again.onnx")
    explicit = tmp_path / "explicit.csv"  # explicit settings still win over the file's
    argv = [str(SAMPLES), str(explicit), "--model", str(tmp_path / "again.onnx"), "--label-map", "none"]
    assert main([*argv, "--progress", "false"]) == 0
    assert all(int(row[1]) >= 0 for row in csv.reader(explicit.open()))
    assert '"label_map": "none"' in (tmp_path / "run.json").read_text()
