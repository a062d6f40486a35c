"""Loading a model folder: module, class, checkpoint forms, and the errors for each mistake."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.errors import ModelError
from harness.models.checkpoint import load_weights, read_state_dict
from harness.models.load import load_model
from harness.models.python_class import load_custom_transform
from harness.sources import build_config

TINY = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(self.pool(x).flatten(1))

    class Other(nn.Module):
        pass
    """
)


def _folder(tmp_path: Path, source: str = TINY, name: str = "model.py") -> Path:
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(source)
    return folder


def _config(folder: Path, **settings: str):
    return build_config({"model_dir": str(folder), **settings}, {})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"fc.weight": torch.randn(4, 3), "fc.bias": torch.randn(4)}


@pytest.mark.parametrize("form", ["plain", "state_dict", "model", "module_prefix", "nested_and_prefixed"])
def test_checkpoint_forms_load_the_same_weights(tmp_path: Path, form: str) -> None:
    folder = _folder(tmp_path)
    weights = _weights(folder)
    prefixed = {f"module.{k}": v for k, v in weights.items()}
    data = {
        "plain": weights,
        "state_dict": {"state_dict": weights, "epoch": 3},
        "model": {"model": weights},
        "module_prefix": prefixed,
        "nested_and_prefixed": {"state_dict": prefixed},
    }[form]
    torch.save(data, folder / "w.pth")
    loaded = load_model(_config(folder, class_name="Tiny", checkpoint="w.pth"))
    assert torch.equal(loaded.module.fc.weight, weights["fc.weight"])
    assert not loaded.module.training
    assert loaded.parameters == 16


def test_checkpoint_path_relative_to_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path)
    torch.save(_weights(folder), folder / "w.pth")
    monkeypatch.chdir(tmp_path)  # the template passed "model/w.pth"-style paths
    assert load_model(_config(Path("m"), class_name="Tiny", checkpoint="m/w.pth")).checkpoint == "m/w.pth"


def test_missing_class_lists_the_classes_there(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no model class 'Net'\. Classes there: Other, Tiny"):
        load_model(_config(_folder(tmp_path), class_name="Net"))


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    torch.save({"fc.weight": torch.zeros(4, 3), "head.bias": torch.zeros(4)}, folder / "w.pth")
    with pytest.raises(ModelError, match=r"1 missing: fc\.bias; 1 unexpected: head\.bias"):
        load_model(_config(folder, class_name="Tiny", checkpoint="w.pth"))
    torch.save({"fc.weight": torch.zeros(5, 3), "fc.bias": torch.zeros(4)}, folder / "w.pth")
    with pytest.raises(ModelError, match=r"wrong shape .*fc\.weight \(5, 3\) vs \(4, 3\)"):
        load_model(_config(folder, class_name="Tiny", checkpoint="w.pth"))


def test_pickled_module_is_refused_and_missing_checkpoint_lists_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    torch.save(torch.nn.Linear(3, 4), folder / "whole.pth")
    with pytest.raises(ModelError, match=r"pickled Python objects \(torch\.nn\.modules\.linear\.Linear\)"):
        load_model(_config(folder, class_name="Tiny", checkpoint="whole.pth"))
    with pytest.raises(ModelError, match=r"not found .* Files in .*: model\.py, whole\.pth"):
        load_model(_config(folder, class_name="Tiny", checkpoint="nope.pth"))
    (folder / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        load_model(_config(folder, class_name="Tiny", checkpoint="junk.pth"))


def test_weights_built_into_the_class_need_no_checkpoint(tmp_path: Path) -> None:
    assert load_model(_config(_folder(tmp_path), class_name="Tiny")).checkpoint is None


def test_errors_in_user_code_name_file_and_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "import torch\n\nraise ValueError('broken on purpose')\n")
    with pytest.raises(ModelError, match=r"ValueError: broken on purpose \(model.py:3\)"):
        load_model(_config(folder))
    folder = _folder(
        tmp_path, "from torch import nn\n\nclass Model(nn.Module):\n    def __init__(self):\n        1 / 0\n"
    )
    with pytest.raises(ModelError, match=r"creating Model\(\) failed: ZeroDivisionError"):
        load_model(_config(folder))


def test_a_class_that_needs_arguments_says_the_harness_passes_none(tmp_path: Path) -> None:
    source = (
        "from torch import nn\n\nclass Model(nn.Module):\n    def __init__(self, depth, *, width, b=1):\n        pass\n"
    )
    with pytest.raises(
        ModelError, match=r"Model\(\) needs arguments \(depth, width\), and the harness builds your class"
    ):
        load_model(_config(_folder(tmp_path, source)))


def test_the_templates_file_beside_the_examples_is_used_when_it_holds_the_class(tmp_path: Path, capsys) -> None:
    """The template's model_description.py copied into a folder that keeps the example's model.py: the class named
    (the template's third positional argument) is taken from the file that defines it, and one line says so."""
    folder = _folder(tmp_path, "from torch import nn\n\nclass EfficientNetLite0(nn.Module):\n    pass\n")
    _folder(tmp_path, TINY, name="model_description.py")
    loaded = load_model(_config(folder, class_name="Tiny"))
    assert loaded.source.endswith("model_description.py")
    assert "class Tiny is in" in capsys.readouterr().err
    with pytest.raises(ModelError) as refused:
        load_model(_config(folder, class_name="Absent"))
    said = str(refused.value)
    assert "has no model class 'Absent'" in said and "--module FILE or --model-dir FOLDER" in said
    assert "the folder also holds model_description.py" in said


def test_missing_folder_or_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(_config(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"neither model\.py nor model_description\.py"):
        load_model(_config(tmp_path / "empty"))


def test_template_model_folder_with_its_own_transform(tmp_path: Path) -> None:
    folder = _folder(tmp_path, TINY, name="model_description.py")
    (folder / "data_transform_description.py").write_text(
        textwrap.dedent(
            """
            import torchvision.transforms as transforms

            class data_transform:
                def getTransform(self):
                    return transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32),
                                               transforms.ToTensor()])
            """
        )
    )
    config = _config(folder, class_name="Tiny")
    assert load_model(config).source.endswith("model_description.py")
    transform = load_custom_transform(config.transform_file)
    from PIL import Image

    assert transform(Image.new("RGB", (64, 48))).shape == (3, 32, 32)


def test_a_checkpoint_that_does_not_fit_lists_the_first_ten_of_each_kind_and_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    model = torch.nn.Sequential(*(torch.nn.Linear(1, 1, bias=False) for _ in range(11)))
    names = [f"{index}.weight" for index in range(11)]
    with pytest.raises(ModelError) as eleven:
        load_weights(model, {}, path)
    assert str(eleven.value) == (
        f"{path} does not fit the model class. 11 missing: {', '.join(names[:10])}, ... (1 more)"
    )
    with pytest.raises(ModelError) as ten:
        load_weights(model, {"0.weight": torch.zeros(2, 1), "extra": torch.zeros(1)}, path)
    assert str(ten.value) == (
        f"{path} does not fit the model class. 10 missing: {', '.join(names[1:])}; 1 unexpected: extra; "
        "1 wrong shape (file vs model): 0.weight (2, 1) vs (1, 1)"
    )


def _saved(path: Path, data: object) -> Path:
    torch.save(data, path)
    return path


def test_timms_ema_rule_chooses_the_weights_and_one_line_says_which(tmp_path: Path, capsys) -> None:
    own, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    both = _saved(tmp_path / "ckpt.pth", {"state_dict": own, "state_dict_ema": ema, "epoch": 3})
    for choice, entry, rule in (
        (None, "state_dict_ema", "timm's rule; --ema false for its own"),
        (True, "state_dict_ema", "--ema true"),
        (False, "state_dict", "--ema false"),
    ):
        weights = read_state_dict(both, choice)
        assert (weights.entry, float(weights.state["w"]), weights.is_ema) == (
            entry,
            float(entry == "state_dict_ema"),
            entry == "state_dict_ema",
        )
        assert capsys.readouterr().err == (
            f"harness: ckpt.pth holds its own weights (state_dict) and EMA weights (state_dict_ema): using {entry} "
            f"({rule})\n"
        )
    alone = _saved(tmp_path / "own.pth", {"model": own})
    assert read_state_dict(alone).entry == "model" and capsys.readouterr().err == ""
    keys = {f"k{i:02d}": torch.zeros(1) for i in range(12)}
    for data, held in (
        ({"state_dict": own, "args": 1}, "args, state_dict"),
        (keys, ", ".join(sorted(keys)[:10])),
        ([1], "list"),
    ):
        with pytest.raises(ModelError) as refused:
            read_state_dict(_saved(tmp_path / "no-ema.pth", data), True)
        assert str(refused.value) == (
            f"--ema: {tmp_path / 'no-ema.pth'} holds no EMA weights (state_dict_ema or model_ema); it holds: {held}"
        )
    with pytest.raises(ModelError, match=r"does not hold a state_dict \(a mapping of parameter names to tensors\)$"):
        read_state_dict(_saved(tmp_path / "list.pth", [torch.zeros(1)]))


def test_a_checkpoint_file_is_read_as_its_kind_or_refused_in_words(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(3.0)}
    for name in ("w.safetensors", "W.SAFETENSORS"):
        save_file(tensors, tmp_path / name)
        assert torch.equal(read_state_dict(tmp_path / name).state["w"], tensors["w"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ModelError, match=rf"^{tmp_path / 'bad.safetensors'} is not a readable safetensors file: "):
        read_state_dict(tmp_path / "bad.safetensors")
    cut = _saved(tmp_path / "cut.pth", tensors)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(ModelError, match=rf"^{cut} is not a PyTorch checkpoint: RuntimeError: "):
        read_state_dict(cut)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ModelError) as missing:
        read_state_dict(tmp_path / "w.safetensors")
    assert str(missing.value) == (
        f"{tmp_path / 'w.safetensors'} is a safetensors file, and safetensors is not installed: pip install safetensors"
    )


def test_a_pickled_object_in_a_checkpoint_is_named_and_the_fix_given(tmp_path: Path) -> None:
    path = _saved(tmp_path / "whole.pth", {"model": torch.nn.Identity()})
    with pytest.raises(ModelError) as refused:
        read_state_dict(path)
    assert str(refused.value) == (
        f"{path} holds pickled Python objects (torch.nn.modules.linear.Identity), so it is not loaded: that would "
        "run code from the file. Save the weights with torch.save(model.state_dict(), ...)."
    )


def test_a_file_that_does_not_unpickle_and_names_wrapped_or_not(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError) as refused:
        read_state_dict(garbage)
    assert str(refused.value) == f"{garbage} is not a PyTorch checkpoint (it does not unpickle)"
    wrapped = {"module.a": torch.zeros(1), "module.b": torch.zeros(1)}
    assert set(read_state_dict(_saved(tmp_path / "ddp.pth", wrapped)).state) == {"a", "b"}
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}  # not a wrapper's: every name kept as written
    assert set(read_state_dict(_saved(tmp_path / "mixed.pth", mixed)).state) == {"module.a", "b"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("Unsupported global: GLOBAL a.A was not an allowed global; Unsupported global: GLOBAL b.B", "a.A, b.B"),
        ("Weights only load failed: Unsupported global", "not only tensors"),
    ],
)
def test_a_pickle_refusal_names_every_class_it_names_or_says_it_holds_more_than_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, named: str
) -> None:
    import pickle

    path = _saved(tmp_path / "w.pth", {"w": torch.zeros(1)})

    def refuses(*_: object, **__: object) -> None:
        raise pickle.UnpicklingError(text)

    monkeypatch.setattr(torch, "load", refuses)
    with pytest.raises(ModelError, match=rf"^{path} holds pickled Python objects \({named}\), so it is not loaded"):
        read_state_dict(path)


def test_a_checkpoint_not_found_lists_the_model_folders_files_or_none(tmp_path: Path) -> None:
    from harness.models.checkpoint import resolve_checkpoint

    folder = tmp_path / "model"
    for present, listed in ((None, "none"), ([], "none"), (["b.pt", "a.txt"], "a.txt, b.pt")):
        if present is not None:
            folder.mkdir(exist_ok=True)
            for name in present:
                (folder / name).write_text("x")
        config = build_config({"model_dir": str(folder), "checkpoint": "w.pth"}, {}, {})
        with pytest.raises(ModelError) as missing:
            resolve_checkpoint(config)
        assert str(missing.value) == (
            f"checkpoint w.pth not found (looked in the working directory and {folder}). Files in {folder}: {listed}"
        )
