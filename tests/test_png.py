"""PNGs decoded by libspng (harness/pipeline/png.py) give exactly Pillow's RGB: the sample images, the shared
ObjectNet samples, and generated files of every colour type and bit depth, interlaced or not, with and without
transparency, tiny, and with the metadata Pillow rotates by. A file libspng does not take is Pillow's, errors
included."""

from __future__ import annotations

import contextlib
import ctypes.util
import struct
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import harness.pipeline.png
from harness.config import Preprocess
from harness.pipeline.decode import DEFAULT_OPTIONS as DEFAULT
from harness.pipeline.decode import DecodeOptions, ImageTooLarge, decode, decode_sample
from harness.pipeline.decode_options import DecodeLimits, Decoding
from harness.pipeline.png import open_png
from tests.helpers import SAMPLES
from tests.image_corpus import CHANNELS, chunk, write_png

pytest.importorskip("pyspng")

DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _random_png(path: Path, colour: int, depth: int, size: tuple[int, int], interlace: bool, **extra: object) -> Path:
    rng = np.random.default_rng(abs(hash((colour, depth, size, interlace))) % 2**32)
    height, width = size
    if colour == 3:
        entries = 2**depth
        palette = rng.integers(0, 256, (entries, 3))
        samples = rng.integers(0, entries, (height, width, 1))
        return write_png(path, samples, colour, depth, interlace=interlace, palette=palette, **extra)
    samples = rng.integers(0, 2**depth, (height, width, CHANNELS[colour]))
    if colour in (4, 6):  # alpha: opaque, clear and in between, so the compositing onto white shows
        samples[..., -1] = rng.choice([0, 2**depth - 1, 2 ** (depth - 1), 1], (height, width))
    return write_png(path, samples, colour, depth, interlace=interlace, **extra)


@contextlib.contextmanager
def pillow_alone() -> Iterator[None]:
    """Decoding as the harness did before libspng: Pillow for every file."""
    saved = harness.pipeline.png.LIBSPNG
    harness.pipeline.png.LIBSPNG = None
    try:
        yield
    finally:
        harness.pipeline.png.LIBSPNG = saved


def _pillow(path: Path, options: DecodeOptions = DEFAULT, border: int | str = 0) -> np.ndarray:
    with pillow_alone():
        return np.asarray(decode(str(path), options, border=border))


# the default (Image.open(path).convert("RGB")), and each option on its own
OPTIONS = [
    DEFAULT,
    DecodeOptions(alpha="white"),
    DecodeOptions(exif_transpose=True),
    DecodeOptions(sixteen_bit="scale"),
]


def _assert_libspng_gives_pillows_rgb(path: Path) -> None:
    """Under the default and each option; frame stripped or not, found or not, and wider than a tiny image allows.
    libspng takes every file but 16-bit grey, which it cuts to the high byte where convert("RGB") clips: that is
    libspng's only under sixteen_bit scale."""
    with Image.open(path) as image:
        clipped = image.mode.startswith("I;16")
        reference = np.asarray(image.convert("RGB"))
    assert np.array_equal(np.asarray(decode(str(path))), reference), path.name
    for options in OPTIONS:
        png = open_png(str(path), options)
        taken = png is not None and png.pixels() is not None
        assert taken != (clipped and options.sixteen_bit == "clip"), (path.name, options)
        for border in (0, 2, "auto", 5):
            image = decode(str(path), options, border=border)
            assert image.mode == "RGB"
            assert np.array_equal(np.asarray(image), _pillow(path, options, border)), (path.name, options, border)


# chelsea.png carries XMP metadata, which Pillow reads an orientation from: Pillow's (see below)
REAL = [path for path in sorted(SAMPLES.glob("*.png")) if path.name != "chelsea.png"]


@pytest.mark.parametrize("path", REAL, ids=lambda path: path.name)
def test_the_sample_pngs_and_objectnets_decode_to_pillows_rgb(path: Path) -> None:
    """The sample images hold the ObjectNet samples: RGBA, their text after the image data."""
    _assert_libspng_gives_pillows_rgb(path)


CASES = [(colour, depth) for colour, depths in DEPTHS.items() for depth in depths]


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "interlaced"])
@pytest.mark.parametrize(("colour", "depth"), CASES, ids=[f"type{c}-{d}bit" for c, d in CASES])
@pytest.mark.parametrize("size", [(37, 29), (1, 1), (2, 9)], ids=["37x29", "1x1", "2x9"])
def test_every_colour_type_and_depth_gives_pillows_rgb(
    tmp_path: Path, colour: int, depth: int, interlace: bool, size: tuple[int, int]
) -> None:
    _assert_libspng_gives_pillows_rgb(_random_png(tmp_path / "x.png", colour, depth, size, interlace))


def test_an_opaque_rgba_png_and_a_sixteen_bit_one_saved_by_pillow(tmp_path: Path) -> None:
    """Pillow's own encoder (adaptive filters, one IDAT) for the two ObjectNet-like modes it writes."""
    rng = np.random.default_rng(0)
    rgba = np.dstack([rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), np.full((50, 70), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    Image.fromarray(rng.integers(0, 65536, (50, 70), dtype=np.uint16)).save(tmp_path / "grey16.png")
    for name in ("opaque.png", "grey16.png"):
        _assert_libspng_gives_pillows_rgb(tmp_path / name)


def _trns(colour: int, depth: int) -> bytes:
    if colour == 3:
        return chunk(b"tRNS", bytes([0, 128, 255]))
    return chunk(b"tRNS", struct.pack(">HHH" if colour == 2 else ">H", *([1] * (3 if colour == 2 else 1))))


EXIF_ROTATED = Image.Exif()
EXIF_ROTATED[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view


COMPOSITED = DecodeOptions(alpha="white")
TURNED = DecodeOptions(exif_transpose=True)


@pytest.mark.parametrize(
    ("name", "colour", "depth", "extra", "options"),
    [
        ("palette-trns", 3, 4, {"before": (_trns(3, 4),)}, COMPOSITED),
        ("grey-trns", 0, 8, {"before": (_trns(0, 8),)}, COMPOSITED),
        ("rgb-trns", 2, 8, {"before": (_trns(2, 8),)}, COMPOSITED),
        ("exif-before", 2, 8, {"before": (chunk(b"eXIf", EXIF_ROTATED.tobytes()),)}, TURNED),
        ("exif-after", 2, 8, {"after": (chunk(b"eXIf", EXIF_ROTATED.tobytes()),)}, TURNED),
        ("exif-text-after", 2, 8, {"after": (chunk(b"tEXt", b"Raw profile type exif\0exif"),)}, TURNED),
        ("ztxt-after", 2, 8, {"after": (chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"written last")),)}, DEFAULT),
        ("xmp", 2, 8, {"before": (chunk(b"iTXt", b'XML:com.adobe.xmp\0\0\0\0\0<x tiff:Orientation="6"/>'),)}, TURNED),
    ],
)
def test_what_libspng_does_not_take_is_pillows(
    tmp_path: Path, name: str, colour: int, depth: int, extra: dict, options: DecodeOptions
) -> None:
    path = _random_png(tmp_path / f"{name}.png", colour, depth, (6, 11), False, **extra)
    assert open_png(str(path), options) is None
    assert np.array_equal(np.asarray(decode(str(path), options)), _pillow(path, options))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")  # the reference's convert
@pytest.mark.parametrize(("colour", "depth"), [(3, 4), (3, 8), (0, 8), (2, 8), (2, 16)])
def test_transparency_that_is_dropped_is_libspngs(tmp_path: Path, colour: int, depth: int) -> None:
    """libspng ignores tRNS, as convert("RGB") does: such a file is libspng's unless its transparency is
    composited. Pillow's path drops it too, without Pillow's warning for each palette image."""
    path = _random_png(tmp_path / "t.png", colour, depth, (6, 11), False, before=(_trns(colour, depth),))
    assert "transparency" in Image.open(path).info
    assert open_png(str(path), DEFAULT) is not None
    assert np.array_equal(np.asarray(decode(str(path))), np.asarray(Image.open(path).convert("RGB")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(_pillow(path), np.asarray(decode(str(path))))


def test_pillow_rotates_by_a_pngs_exif_when_asked_and_so_does_the_harness(tmp_path: Path) -> None:
    path = _random_png(tmp_path / "r.png", 2, 8, (6, 11), False, after=(chunk(b"eXIf", EXIF_ROTATED.tobytes()),))
    assert decode(str(path)).size == (11, 6) and decode(str(path), TURNED).size == (6, 11)


def test_orientation_metadata_is_libspngs_when_exif_transpose_is_off(tmp_path: Path) -> None:
    path = _random_png(tmp_path / "r.png", 2, 8, (6, 11), False, before=(chunk(b"eXIf", EXIF_ROTATED.tobytes()),))
    assert open_png(str(path), DEFAULT) is not None
    assert np.array_equal(np.asarray(decode(str(path))), _pillow(path))
    assert open_png(str(SAMPLES / "chelsea.png"), DEFAULT) is not None  # its XMP carries an orientation


def _outcome(path: Path) -> tuple[np.ndarray | None, str]:
    sample, error, _ = decode_sample(str(path), Decoding(Preprocess(border=0)), np.asarray)
    return sample, error


def test_damaged_pngs_fail_with_pillows_reasons(tmp_path: Path) -> None:
    """A bad checksum before the image data, a cut-off file, and damaged image data that still inflates (random
    pixels are stored, not compressed, so only the checksums tell): the same failure row as with Pillow alone."""
    good = _random_png(tmp_path / "good.png", 2, 8, (40, 30), False).read_bytes()
    ihdr_end = good.index(b"IDAT") - 4
    damaged = {
        "bad-ihdr-crc.png": good[: ihdr_end - 1] + bytes([good[ihdr_end - 1] ^ 1]) + good[ihdr_end:],
        "truncated.png": good[: len(good) // 2],
        "zeroed-data.png": good[: ihdr_end + 30] + bytes(40) + good[ihdr_end + 70 :],
    }
    for name, data in damaged.items():
        path = tmp_path / name
        path.write_bytes(data)
        image, reason = _outcome(path)
        with pillow_alone():
            assert (image, reason) == (None, _outcome(path)[1]) and reason, name


def test_a_wrong_zlib_checksum_under_right_crcs_fails_as_with_pillow(tmp_path: Path) -> None:
    """The image data's Adler-32 changed and every chunk's CRC made right again: Pillow refuses the file, and so
    does the fast path (was: libspng, called as pyspng calls it, checked neither and decoded it)."""
    data = bytearray(_random_png(tmp_path / "good.png", 2, 8, (40, 30), False).read_bytes())
    start = data.index(b"IDAT")
    length = struct.unpack_from(">I", data, start - 4)[0]
    data[start + 4 + length - 1] ^= 0xFF  # the stream's last byte: its Adler-32
    struct.pack_into(">I", data, start + 4 + length, zlib.crc32(data[start : start + 4 + length]))
    path = tmp_path / "bad-adler.png"
    path.write_bytes(bytes(data))
    image, reason = _outcome(path)
    with pillow_alone():
        expected = _outcome(path)
    assert expected[0] is None and expected[1]  # Pillow refuses it
    assert (image, reason) == expected


objectnet_png = (SAMPLES / "42d42cf4b12b41c.png").read_bytes()


@given(st.lists(st.tuples(st.integers(0, len(objectnet_png) - 1), st.integers(0, 255)), min_size=1, max_size=3))
@settings(max_examples=150, deadline=None)
def test_any_damage_to_an_objectnet_png_ends_as_with_pillow(damage: list[tuple[int, int]]) -> None:
    """Bytes overwritten anywhere (header, image data, the text after it): the same pixels or the same reason."""
    data = bytearray(objectnet_png)
    for position, value in damage:
        data[position] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "damaged.png"
        path.write_bytes(bytes(data))
        image, reason = _outcome(path)
        with pillow_alone():
            expected, expected_reason = _outcome(path)
    assert reason == expected_reason
    assert (image is None and expected is None) or np.array_equal(image, expected)


def test_max_pixels_refuses_from_the_header(tmp_path: Path) -> None:
    path = _random_png(tmp_path / "x.png", 2, 8, (40, 30), False)
    with pytest.raises(ImageTooLarge, match="30x40 pixels is more than max_pixels"):
        decode(str(path), max_pixels=1199)


def test_without_pyspng_every_png_is_pillows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.pipeline.png, "LIBSPNG", None)
    assert open_png(str(SAMPLES / "coffee.png"), DEFAULT) is None
    assert decode(str(SAMPLES / "coffee.png")).size == (600, 400)


def test_the_decode_timeout_stops_libspng_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode that outlasts decode_timeout is a failure row, not handed to Pillow for another try."""

    class Stuck:
        @staticmethod
        def load(data: bytes, size: tuple[int, int], mode: str) -> None:
            time.sleep(30)

    monkeypatch.setattr(harness.pipeline.png, "LIBSPNG", Stuck)
    started = time.monotonic()
    image, reason, _ = decode_sample(
        str(SAMPLES / "coffee.png"), Decoding(Preprocess(), DecodeLimits(timeout=0.5)), np.asarray
    )
    assert image is None and reason.startswith("DecodeTimeout") and time.monotonic() - started < 5


def test_libspng_is_loaded_from_pyspngs_library_or_left_to_pillow_when_it_cannot_be(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The decoder the run loads at import (harness.pipeline.png.LIBSPNG), loaded again here: it decodes a PNG as
    the one loaded at import does; without pyspng, or with a build whose library hides libspng's names or cannot
    be loaded, there is none and Pillow decodes."""
    path = _random_png(tmp_path / "rgba.png", 6, 8, (7, 5), False)
    found = open_png(str(path), DEFAULT)
    assert found is not None and harness.pipeline.png.LIBSPNG is not None
    fresh = harness.pipeline.png._libspng()
    assert fresh is not None
    pixels = fresh.load(found.data, found.size, "RGBA")
    assert pixels is not None and np.array_equal(pixels, np.asarray(Image.open(path)))
    assert fresh.load(found.data[:-20], found.size, "RGBA") is None  # the end cut off: refused, not guessed
    for stand_in in (
        None,
        type("Build", (), {"__file__": ctypes.util.find_library("c") or "libc.so.6"}),
        type("Gone", (), {"__file__": str(tmp_path / "none.so")}),
    ):
        monkeypatch.setattr(harness.pipeline.png, "_pyspng", stand_in)
        assert harness.pipeline.png._libspng() is None


MAX_TEXT = harness.pipeline.png.PngImagePlugin.MAX_TEXT_MEMORY


def _bad_crc(kind: bytes, body: bytes) -> bytes:
    whole = chunk(kind, body)
    return whole[:-4] + bytes(4)


@pytest.mark.parametrize(
    ("tail", "text_memory", "exif_transpose", "nothing"),
    [
        (b"", 0, False, True),
        (b"\0" * 7, 0, False, True),  # less than a chunk's header: where Pillow stops
        (struct.pack(">I", 0) + b"tEXt", 0, False, False),  # a header whose CRC is missing: cut short
        (chunk(b"tEXt", b"Comment\0hello")[:-2], 0, False, False),  # its CRC cut in two
        (struct.pack(">I", 0xFFFFFFF0) + b"IDAT", 0, False, False),  # a length past the end
        (chunk(b"tEXt", b"Comment\0hello"), 0, False, True),  # a whole chunk that ends the file exactly
        (chunk(b"IDAT", b"xx") + chunk(b"IEND", b""), 0, False, True),
        (_bad_crc(b"tEXt", b"Comment\0hello") + chunk(b"IEND", b""), 0, False, False),
        (_bad_crc(b"IDAT", b"xx") + chunk(b"IEND", b""), 0, False, True),  # libspng checks the image data's
        (chunk(b"zzZz", b"private") + chunk(b"IEND", b""), 0, False, True),  # no reader in Pillow
        (chunk(b"tEXt", b"Comment\0hi") + chunk(b"pHYs", bytes(9)), 0, False, False),
        (chunk(b"tEXt", b"exif\0data"), 0, True, False),  # orientation, when the run turns images
        (chunk(b"tEXt", b"exif\0data"), 0, False, True),
        (chunk(b"tEXt", b"exif\0x\0y"), 0, True, False),  # the keyword ends at the first NUL
        (chunk(b"tEXt", b"Comment\0" + b"x" * 6) * 2, MAX_TEXT - 10, False, False),  # text adds up
        (chunk(b"tEXt", b"Comment\0" + b"x" * 5) * 2, MAX_TEXT - 10, False, True),  # up to the limit exactly
        (chunk(b"tEXt", b"\0" + b"x" * 10), MAX_TEXT, False, True),  # no keyword: Pillow keeps no text
    ],
)
def test_what_follows_the_image_data_is_judged_chunk_by_chunk(
    tail: bytes, text_memory: int, exif_transpose: bool, nothing: bool
) -> None:
    from harness.pipeline.png import _pillow_reads_nothing_after

    head = b"\x89PNG\r\n\x1a\n"
    assert _pillow_reads_nothing_after(head + tail, len(head), text_memory, exif_transpose) is nothing


@pytest.mark.parametrize("default_image", [False, True], ids=["first-frame-is-the-image", "image-outside-animation"])
def test_an_animated_png_is_pillows_to_decode_whole(tmp_path: Path, default_image: bool) -> None:
    """An APNG's pixels are Pillow's first frame, which is not the image data libspng would decode when the file's
    default image stands outside the animation."""
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    path = tmp_path / "animated.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], default_image=default_image)
    assert open_png(str(path), DEFAULT) is None
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(np.asarray(decode(str(path), DEFAULT)), expected)


def test_every_libspng_context_made_is_freed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One per decoded file: a context left behind would hold memory for every image of a run of millions."""
    library = harness.pipeline.png.LIBSPNG
    if library is None:
        pytest.skip("pyspng is not installed")
    made: list[int] = []
    freed: list[int] = []
    new, free = library.new, library.free

    def counted_new(flags: int) -> int:
        made.append(new(flags))
        return made[-1]

    monkeypatch.setattr(library, "new", counted_new)
    monkeypatch.setattr(library, "free", lambda context: (freed.append(context), free(context)))
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(path)
    png = open_png(str(path), DEFAULT)
    assert png is not None and png.pixels() is not None
    assert made and all(made) and freed == made
