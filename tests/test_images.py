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


def _jpeg(path: Path, size: tuple[int, int]) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return str(path)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_max_pixels_is_checked_on_the_files_own_size_up_to_it_exactly(tmp_path: Path, kind: str) -> None:
    from harness.pipeline.decode import ImageTooLarge, decode

    path = tmp_path / f"a.{kind}"
    if kind == "png":
        Image.new("RGB", (40, 30), "red").save(path)
    else:
        _jpeg(path, (40, 30))
    assert decode(str(path), max_pixels=1200).size == (40, 30)  # 40 x 30 exactly
    assert load_rgb(str(path), max_pixels=1200).size == (40, 30)
    for refuse in (lambda: decode(str(path), max_pixels=1199), lambda: load_rgb(str(path), max_pixels=1199)):
        with pytest.raises(ImageTooLarge, match=r"^40x30 pixels is more than max_pixels \(1199\)$"):
            refuse()


@pytest.mark.parametrize(
    ("draft_to", "border", "size"),
    [
        (150, 0, (200, 150)),  # both sides reach twice 150: decoded at half scale
        (151, 0, (400, 300)),  # they do not: full size
        (150, 3, (196, 146)),  # the frame shrinks with it: 3 x 0.5, every pixel it touches (2)
        (151, 3, (394, 294)),
    ],
)
def test_a_jpeg_is_drafted_only_where_both_sides_reach_twice_the_size_and_its_frame_with_it(
    tmp_path: Path, draft_to: int, border: int, size: tuple[int, int]
) -> None:
    from harness.pipeline.decode import decode

    path = _jpeg(tmp_path / "a.jpg", (400, 300))
    decoded = decode(path, draft_to=draft_to, border=border)
    assert decoded.size == size
    with Image.open(path) as reference:
        reference.draft("RGB", (draft_to, draft_to))
        whole = reference.convert("RGB")
        cut = (size[0] - whole.width) // -2
        expected = whole.crop((cut, cut, whole.width - cut, whole.height - cut))
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_a_png_is_never_drafted_and_auto_frames_survive_a_draft(tmp_path: Path) -> None:
    from harness.pipeline.decode import decode

    png = tmp_path / "a.png"
    Image.new("RGB", (400, 300), "red").save(png)
    assert decode(str(png), draft_to=150).size == (400, 300)
    assert decode(_jpeg(tmp_path / "a.jpg", (400, 300)), draft_to=150, border="auto").size == (200, 150)


def test_an_rgb_image_as_opened_is_returned_usable(tmp_path: Path) -> None:
    """A JPEG already RGB and no frame: the decoded image is the opened one, copied before the file closes."""
    from harness.pipeline.decode import decode

    path = _jpeg(tmp_path / "a.jpg", (40, 30))
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(np.asarray(decode(path)), expected)


@pytest.mark.parametrize(
    ("mode", "size", "limit", "refused"),
    [
        (
            "shorter",
            (20000, 1),
            10**6,
            "its 20000 x 1 pixels resized to 224 on the shorter side would be 4480000 x 224",
        ),
        ("shorter", (448, 224), 448 * 224, ""),  # exactly the limit
        (
            "shorter",
            (449, 224),
            448 * 224,
            "its 449 x 224 pixels resized to 224 on the shorter side would be 449 x 224",
        ),
        ("squash", (20000, 1), 10**6, ""),  # squashed to the input size whatever its shape
        ("shorter", (20000, 1), None, ""),
    ],
)
def test_an_aspect_ratio_bomb_is_refused_by_the_size_its_resize_would_make(
    mode: str, size: tuple[int, int], limit: int | None, refused: str
) -> None:
    from harness.config import Preprocess
    from harness.pipeline.decode import ImageTooLarge, check_resized

    pre = Preprocess(resize_mode=mode, resize_size=224, input_size=224)
    if not refused:
        check_resized(size, pre, limit)
        return
    with pytest.raises(ImageTooLarge) as caught:
        check_resized(size, pre, limit)
    assert str(caught.value) == f"{refused}, more than max_pixels ({limit:,})"


def test_a_file_that_cannot_be_statted_is_seen_as_nothing(tmp_path: Path) -> None:
    from harness.pipeline.decode import seen

    assert seen(str(tmp_path / "missing.png")) == ""
    (tmp_path / "a.png").write_bytes(b"12345")
    assert seen(str(tmp_path / "a.png")).startswith("5:")


def test_a_decoder_takes_the_runs_draft_frame_and_limits_and_says_why_a_file_failed(tmp_path: Path) -> None:
    from harness.config import Preprocess
    from harness.pipeline.decode import ModelFailure, ModelFault, decode_sample
    from harness.pipeline.decode_options import DecodeLimits, Decoding

    path = _jpeg(tmp_path / "a.jpg", (400, 300))
    pre = Preprocess(jpeg_draft=True, resize_size=150, input_size=150, border=3)
    assert decode_sample(path, Decoding(pre), lambda image: image.size)[:2] == ((196, 146), "")
    small = DecodeLimits(max_pixels=119_999)
    assert decode_sample(path, Decoding(Preprocess(), small), lambda image: image.size)[:2] == (
        None,
        "ImageTooLarge: 400x300 pixels is more than max_pixels (119999)",
    )
    strip = _jpeg(tmp_path / "strip.jpg", (2000, 8))
    bomb = DecodeLimits(max_pixels=10**5)
    image, why, _ = decode_sample(strip, Decoding(Preprocess(border=0), bomb), lambda image: image.size)
    assert image is None and why.startswith("ImageTooLarge: its 2000 x 8 pixels resized to ")

    def fails(_: Image.Image) -> None:
        raise ModelFault("the model's transform broke")

    _, why, _ = decode_sample(path, Decoding(Preprocess()), fails)
    assert isinstance(why, ModelFailure) and why == "the model's transform broke"

    def changes_the_file(image: Image.Image) -> tuple[int, int]:
        with open(path, "ab") as file:
            file.write(b"more")
        return image.size

    assert decode_sample(path, Decoding(Preprocess()), changes_the_file)[:2] == (
        None,
        "the file changed while it was read",
    )


@pytest.mark.parametrize(
    ("height", "width", "cut", "cuts"),
    [
        (20, 20, -1, 0),
        (20, 20, 0, 0),
        (20, 20, 1, 1),
        (20, 10, 5, 0),  # as wide as the two sides' frames: nothing would be left
        (20, 11, 5, 5),
        (10, 20, 5, 0),
        (11, 20, 5, 5),
    ],
)
def test_a_frame_is_cut_only_from_an_image_that_keeps_a_pixel(height: int, width: int, cut: int, cuts: int) -> None:
    from harness.pipeline.decode import border_width

    assert border_width(np.zeros((height, width, 3), dtype=np.uint8), cut) == cuts


def _framed(size: tuple[int, int], rings: list[tuple[int, int, int]], inside: tuple[int, int, int]) -> np.ndarray:
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = inside
    for k, colour in enumerate(rings):
        pixels[k, k : size[0] - k] = colour
        pixels[size[1] - 1 - k, k : size[0] - k] = colour
        pixels[k : size[1] - k, k] = colour
        pixels[k : size[1] - k, size[0] - 1 - k] = colour
    return pixels


def test_auto_finds_each_ring_within_the_tolerance_and_stops_short_of_the_middle() -> None:
    red, near, blue = (255, 0, 0), (215, 0, 0), (0, 0, 255)  # near: exactly the tolerance (40) from red
    assert detect_border(_framed((40, 30), [red, near], blue)) == 2
    assert detect_border(_framed((40, 30), [red, (214, 0, 0)], blue)) == 1
    assert detect_border(np.full((5, 7, 3), 9, dtype=np.uint8)) == 2  # one colour: up to the rings around the middle
    assert detect_border(np.full((40, 40, 3), 9, dtype=np.uint8)) == 8  # at most AUTO_BORDER_MAX
    image = Image.fromarray(_framed((10, 10), [red], blue))
    assert strip_border(image, 1).size == (8, 8) and strip_border(image, 0) is image


def test_auto_judges_an_rgba_frame_by_its_colour_alone(tmp_path: Path) -> None:
    """The frame is found on the pixels `convert("RGB")` gives: a ring of the frame's colour, transparent, is frame."""
    from harness.pipeline.decode import decode

    pixels = np.dstack([_framed((40, 30), [(255, 0, 0)] * 3, (0, 0, 255)), np.full((30, 40), 255, dtype=np.uint8)])
    pixels[2, 2:38, 3] = 0  # the third ring's top row: red, but transparent
    path = tmp_path / "framed.png"
    Image.fromarray(pixels, "RGBA").save(path)
    with Image.open(path) as reference:
        expected = strip_border(reference.convert("RGB"), "auto")
    assert expected.size == (34, 24)
    assert np.array_equal(np.asarray(decode(str(path), border="auto")), np.asarray(expected))


def test_an_image_partly_transparent_is_composited_onto_the_colour_as_pillow_composites() -> None:
    from harness.pipeline.decode import to_rgb

    pixels = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [10, 20, 30, 0]]], dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    options = DecodeOptions(alpha="black")
    expected = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image).convert("RGB")
    assert np.array_equal(np.asarray(to_rgb(image, options)), np.asarray(expected))
    assert np.asarray(to_rgb(image, options))[0, 2].tolist() == [0, 0, 0]
    assert np.array_equal(np.asarray(to_rgb(image)), pixels[..., :3])  # no colour given: the alpha dropped
