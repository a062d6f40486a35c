"""Discovery, decoding to RGB and border stripping, on real and constructed images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.errors import InputError
from harness.pipeline.decode import DecodeOptions, detect_border, load_rgb, scaled_to_rgb, strip_border
from harness.pipeline.files import discover
from tests.helpers import OBJECTNET_SAMPLES, SAMPLES

RED = (255, 0, 0)


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 6), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path, format=fmt)
    return path


def test_discover_finds_every_extension_in_any_case_recursively_and_sorted(tmp_path: Path) -> None:
    names = ["b.JPG", "a.png", "c.Jpeg", "d.BMP", "e.webp", "f.TIF", "g.tiff", "sub/deeper/h.PNG", "sub/a.png"]
    for name in names:
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(name.rsplit(".", 1)[1].lower())
        _save(tmp_path / name, fmt=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / ".hidden.png")
    _save(tmp_path / ".cache" / "x.png")
    keys = [image.key for image in discover(tmp_path)]
    assert keys == sorted(names)
    assert "sub/a.png" in keys and "a.png" in keys  # same basename, two rows


def test_discover_survives_a_symlink_loop(tmp_path: Path) -> None:
    _save(tmp_path / "d" / "x.png")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    assert [image.key for image in discover(tmp_path)] == ["d/x.png"]


def test_discover_rejects_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(InputError, match="not a folder"):
        discover(_save(tmp_path / "x.png"))


def test_sample_folder_keys_are_basenames() -> None:
    keys = [image.key for image in discover(SAMPLES)]
    assert len(keys) == 19 and all("/" not in key for key in keys)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (0, 0, 0, 0), (0, 0, 0)),  # fully transparent: its colour, as convert("RGB") drops alpha
        ("LA", (100, 255), (100, 100, 100)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_modes_convert_to_rgb(tmp_path: Path, mode: str, colour: object, expected: tuple[int, int, int]) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "CMYK" else None
    path = tmp_path / ("x.jpg" if fmt == "JPEG" else "x.png")
    Image.new(mode, (4, 4), colour).save(path, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    image = load_rgb(str(path))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int)[1, 1] - np.array(expected)).max() <= 2


def test_palette_with_transparency_keeps_its_colour_unless_composited(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=1)
    assert load_rgb(str(tmp_path / "p.png")).getpixel((0, 0)) == (200, 10, 10)
    assert load_rgb(str(tmp_path / "p.png"), DecodeOptions(alpha="white")).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_clipped_unless_scaled(tmp_path: Path) -> None:
    values = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert load_rgb(str(tmp_path / "g16.png")).getpixel((0, 0)) == (255, 255, 255)
    scaled = load_rgb(str(tmp_path / "g16.png"), DecodeOptions(sixteen_bit="scale"))
    assert scaled.getpixel((0, 0)) == (128, 128, 128)


def _grey(image: Image.Image) -> list[int]:
    rgb = scaled_to_rgb(image)
    assert rgb.mode == "RGB"
    channels = np.asarray(rgb)
    assert (channels == channels[..., :1]).all()
    return channels[..., 0].ravel().tolist()


def test_deep_grey_is_scaled_by_its_high_byte_or_its_float_range_and_clipped_at_the_ends() -> None:
    """--sixteen-bit scale: integers keep their high byte (anything below 0 or above 65535 at the ends), floats in
    0..1 (1.0 included) or else 0..255 rounded to 0..255, anything outside clipped, never wrapped around."""
    sixteen = Image.fromarray(np.array([[0, 255, 256, 65535]], dtype=np.uint16))
    assert _grey(sixteen) == [0, 0, 1, 255]
    wide = Image.fromarray(np.array([[-5, 0, 32768, 70000]], dtype=np.int32))
    assert wide.mode == "I" and _grey(wide) == [0, 0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F" and _grey(unit) == [0, 64, 128, 255]
    byte_range = Image.fromarray(np.array([[-3.0, 0.0, 1.5, 2.0, 255.0, 300.0]], dtype=np.float32))
    assert _grey(byte_range) == [0, 0, 2, 2, 255, 255]
    just_above_one = Image.fromarray(np.array([[0.0, 1.5, 2.0]], dtype=np.float32))  # 0..255, however dark
    assert _grey(just_above_one) == [0, 2, 2]
    assert scaled_to_rgb(Image.new("F", (0, 0))).size == (0, 0)


def test_exif_orientation_is_applied_only_when_asked(tmp_path: Path) -> None:
    image = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    (tmp_path / "r.jpg").write_bytes(buffer.getvalue())
    assert load_rgb(str(tmp_path / "r.jpg")).size == (6, 2)
    assert load_rgb(str(tmp_path / "r.jpg"), DecodeOptions(exif_transpose=True)).size == (2, 6)


def _red_ring_share(image: Image.Image) -> float:
    pixels = np.asarray(image)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(np.all(ring == RED, axis=1).mean())


@pytest.mark.parametrize("name", OBJECTNET_SAMPLES)
def test_objectnet_red_frame_is_stripped(name: str) -> None:
    original = load_rgb(str(SAMPLES / name))
    assert _red_ring_share(original) == 1.0
    for border in (2, "auto"):
        stripped = strip_border(original, border)
        assert stripped.size == (original.width - 4, original.height - 4)
        assert _red_ring_share(stripped) < 0.01
        assert np.array_equal(np.asarray(stripped), np.asarray(original)[2:-2, 2:-2])


def test_auto_border_finds_frames_of_any_colour_and_ignores_none() -> None:
    rng = np.random.default_rng(0)
    content = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    framed = np.empty((46, 66, 3), dtype=np.uint8)
    framed[:] = (30, 60, 200)  # a 3 px blue frame around random content
    framed[3:-3, 3:-3] = content
    framed[0, 5] = (45, 70, 190)  # compression smear within tolerance
    assert detect_border(Image.fromarray(framed)) == 3
    assert detect_border(Image.fromarray(content)) == 0
    assert detect_border(load_rgb(str(SAMPLES / "coffee.png"))) == 0


def test_a_border_wider_than_the_image_leaves_it_whole() -> None:
    tiny = Image.new("RGB", (3, 3), RED)
    assert strip_border(tiny, 2).size == (3, 3)
    assert strip_border(Image.new("RGB", (1, 1)), "auto").size == (1, 1)
