"""The harness sees what the participant's training pipeline saw: by default every image decodes exactly as
`Image.open(path).convert("RGB")` (torchvision's ImageFolder loader, timm's datasets, the ObjectNet template,
Hugging Face's scripts), and the run's tensor is ImageFolder's with the example model's transform. The opt-in
decode settings (alpha, exif_transpose, sixteen_bit) each do what they say. On a corpus of every mode, derived
from the sample photographs (tests/image_corpus.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import datasets
from torchvision import transforms as T

from harness.config import Preprocess
from harness.errors import ConfigError
from harness.pipeline.decode import DEEP_MODES, DecodeOptions, decode, decode_sample, to_rgb
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import DeviceNormalizer
from harness.pipeline.transforms import geometry
from harness.sources import build_config
from tests.helpers import REPO
from tests.image_corpus import light, photo_crop, write_corpus

# the references convert palettes with transparency as training loaders do, and Pillow warns that it is dropped
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every mode but the 3000 x 2000 photograph, in one class folder as ImageFolder reads it."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "images", large=False)


def _reference(path: Path) -> np.ndarray:
    """What training loaders feed a model: torchvision's pil_loader, `Image.open(f).convert("RGB")`."""
    with open(path, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _each(corpus: dict[str, Path]) -> Iterator[tuple[str, Path]]:
    yield from sorted(corpus.items())


def test_every_mode_decodes_as_image_convert_rgb_byte_for_byte(corpus: dict[str, Path]) -> None:
    for name, path in _each(corpus):
        ours = decode(str(path))
        assert ours.mode == "RGB", name
        assert np.array_equal(np.asarray(ours), _reference(path)), name


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F"])
def test_every_mode_in_memory_converts_as_pillow_does(mode: str) -> None:
    """Modes no file in the corpus opens as (PA, premultiplied RGBa) too: `to_rgb` is `convert("RGB")`."""
    photo = photo_crop("coffee.png", (40, 30), 250, 160)
    translucent = photo.copy()
    translucent.putalpha(light((40, 30)))
    palette = photo.quantize(64).convert("PA")
    palette.putalpha(light((40, 30)))
    made = {"LA": translucent.convert("LA"), "PA": palette}
    image = made.get(mode) or translucent.convert(mode)
    assert image.mode == mode
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def _example_preprocess() -> Preprocess:
    """The example model's preprocessing (model/config.yaml: bicubic 256 -> 224, (x - 127) / 128), without the
    ObjectNet frame, which ImageFolder knows nothing of."""
    return build_config({"model_dir": str(REPO / "model"), "border": 0}, {}).preprocess


def _run_crop(path: Path, pre: Preprocess) -> torch.Tensor:
    """What the run's workers make of a file: decode_sample with the run's geometry, a 3 x S x S uint8 crop."""
    sample, error, _ = decode_sample(str(path), Decoding(pre), lambda image: geometry(image, pre))
    assert not error, (path.name, error)
    return torch.from_numpy(sample)


def _image_folder(root: Path, pre: Preprocess) -> datasets.ImageFolder:
    """ImageFolder with the example model's transform as its training script would write it; each sample also
    carries the uint8 crop before ToTensor, for the exact comparison."""
    crop = T.Compose([T.Resize(pre.resize_to, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    scale = pre.value_scale
    to_model = T.Compose([T.ToTensor(), T.Normalize([m / scale for m in pre.mean], [s / scale for s in pre.std])])

    def transform(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        cropped = crop(image)
        return T.PILToTensor()(cropped), to_model(cropped)

    return datasets.ImageFolder(str(root), transform=transform)


def test_the_runs_tensor_is_image_folders(corpus: dict[str, Path]) -> None:
    """The uint8 crop exactly (as tests/test_transforms.py pins torchvision's geometry), and the model's input
    within float rounding: the harness's one fused multiply-add on the device against ToTensor then Normalize."""
    pre = _example_preprocess()
    assert (pre.interpolation, pre.resize_to, pre.input_size, pre.value_scale) == ("bicubic", 256, 224, 255.0)
    normalise = DeviceNormalizer(pre, torch.device("cpu"), torch.float32, channels_last=False)
    folder = _image_folder(next(iter(corpus.values())).parent.parent, pre)
    assert sorted(Path(path).name for path, _ in folder.samples) == sorted(corpus)
    for (path, _), ((theirs_uint8, theirs), _) in zip(folder.samples, folder, strict=True):
        ours_uint8 = _run_crop(Path(path), pre)
        assert torch.equal(ours_uint8, theirs_uint8), path
        assert np.abs(normalise(ours_uint8.unsqueeze(0))[0].numpy() - theirs.numpy()).max() <= 1e-6, path


def test_a_large_photograph_decodes_and_crops_as_image_folder(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "images", large=True)["large.png"]
    assert np.array_equal(np.asarray(decode(str(path))), _reference(path))
    pre = _example_preprocess()
    folder = _image_folder(tmp_path, pre)
    (theirs, _), _ = folder[[Path(p) for p, _ in folder.samples].index(path)]
    assert torch.equal(_run_crop(path, pre), theirs)


@pytest.mark.parametrize("alpha", ["white", "black", "#3366cc"])
def test_alpha_composites_onto_the_colour_as_pillow_does(corpus: dict[str, Path], alpha: str) -> None:
    """Every image, transparent or not: Pillow's alpha_composite of its RGBA onto an opaque background."""
    options = DecodeOptions(alpha=alpha)
    for name, path in _each(corpus):
        with Image.open(path) as image:
            if image.mode in DEEP_MODES:
                continue  # Pillow has no RGBA of deep grey; no alpha to composite either (below)
            rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, alpha)
        expected = Image.alpha_composite(background, rgba).convert("RGB")
        assert np.array_equal(np.asarray(decode(str(path), options)), np.asarray(expected)), name


def test_alpha_changes_only_the_transparent_images(corpus: dict[str, Path]) -> None:
    transparent = {"rgba-partial.png", "la.png", "palette-trns.png", "grey-trns.png", "rgb-trns.png"}
    transparent |= {"rgba16.png", "interlaced.png", "exif-rotated-rgba.png", "tiny-3x2.png"}
    transparent |= {"Minduka_Present_Blue_Pack.png"}
    changed = {
        name
        for name, path in _each(corpus)
        if not np.array_equal(np.asarray(decode(str(path), DecodeOptions(alpha="white"))), _reference(path))
    }
    assert changed == transparent


def test_exif_transpose_turns_as_image_ops_does(corpus: dict[str, Path]) -> None:
    options = DecodeOptions(exif_transpose=True)
    for name, path in _each(corpus):
        with Image.open(path) as image:
            expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        assert np.array_equal(np.asarray(decode(str(path), options)), expected), name
    rotated = corpus["exif-rotated.jpg"]
    assert decode(str(rotated)).size == (96, 64)
    assert decode(str(rotated), options).size == (64, 96)


def test_sixteen_bit_scale_keeps_the_high_byte(corpus: dict[str, Path]) -> None:
    """Deep grey (16-bit PNG and TIFF, 32-bit integer) by its high byte, float 0..1 to 0..255; every other mode
    as convert("RGB") gives it (a 16-bit colour PNG already opens as 8 bits, by its high byte)."""
    options = DecodeOptions(sixteen_bit="scale")
    for name, path in _each(corpus):
        with Image.open(path) as image:
            mode, values = image.mode, np.asarray(image)
        ours = np.asarray(decode(str(path), options))
        if mode == "F":
            expected = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif mode in DEEP_MODES:
            expected = (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        else:
            assert np.array_equal(ours, _reference(path)), name
            continue
        assert np.array_equal(ours, np.dstack([expected] * 3)), name
        assert not np.array_equal(ours, _reference(path)), name  # clipping would have given other pixels
    assert np.array_equal(_reference(corpus["rgb16.png"]), np.asarray(photo_crop("coffee.png", (96, 64), 200, 150)))


def test_the_run_takes_its_decode_settings_from_config() -> None:
    """Defaults reproduce convert("RGB"); a bad value is a one-line configuration error."""
    assert DecodeOptions.of(Preprocess()) == DecodeOptions()
    pre = build_config({"alpha": "#FFaa00", "exif_transpose": "true", "sixteen_bit": "scale"}, {}, {}).preprocess
    assert DecodeOptions.of(pre) == DecodeOptions("#ffaa00", True, "scale")
    assert DecodeOptions.of(pre).background == (255, 170, 0)
    yaml = {"preprocess": {"alpha": "white"}}
    assert build_config({}, {}, yaml).preprocess.alpha == "white"
    for name, value in [("alpha", "grey"), ("alpha", "#fff"), ("sixteen_bit", "round")]:
        with pytest.raises(ConfigError, match=f"{name}='{value}' is not valid"):
            build_config({name: value}, {}, {})
