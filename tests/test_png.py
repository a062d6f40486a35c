"""PNGs decoded by libspng (harness/pipeline/png.py) give exactly Pillow's RGB: the sample images, the shared
ObjectNet samples, and generated files of every colour type and bit depth, interlaced or not, with and without
transparency, tiny, and with the metadata Pillow rotates by. A file libspng does not take is Pillow's, errors
included."""

from __future__ import annotations

import contextlib
import ctypes.util
import io
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
        def load(data: bytes, size: tuple[int, int], mode: str, checked: bool = False) -> None:
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


def _libspng_strict(data: bytes, size: tuple[int, int], mode: str) -> np.ndarray | None:
    library = harness.pipeline.png.LIBSPNG
    assert library is not None
    return library.load(data, size, mode)


def _stored_of(path: Path) -> tuple[bytes, bytes | None, tuple[int, int], str]:
    data = path.read_bytes()
    size, depth, colour = struct.unpack_from(">II", data, 16), data[24], data[25]
    mode = harness.pipeline.png.FORMATS[(depth, colour)]
    return data, harness.pipeline.png.stored(data, size, depth, colour), size, mode


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Each chunk's type and data, its CRC checked."""
    found, position = [], 8
    while position < len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = data[position + 8 : position + 8 + length]
        assert struct.unpack_from(">I", data, position + 8 + length)[0] == zlib.crc32(kind + body), kind
        found.append((kind, body))
        position += 12 + length
    return found


PLAIN = [(colour, depth) for colour, depth in CASES if (depth, colour) in harness.pipeline.png.FORMATS]


@pytest.mark.parametrize(("colour", "depth"), PLAIN, ids=[f"type{c}-{d}bit" for c, d in PLAIN])
@pytest.mark.parametrize("size", [(37, 29), (1, 1), (257, 509), (257, 508), (1, 65534), (1, 65535)])
def test_stored_is_the_same_png_with_its_image_data_inflated(
    tmp_path: Path, colour: int, depth: int, size: tuple[int, int]
) -> None:
    """Every chunk but the image data as it was; the image data one IDAT of stored deflate blocks, whose CRC and
    Adler-32 are right (libspng with every check on takes it); the pixels libspng gives the original, with and
    without its checks. Sizes around one and two stored blocks (65,535 bytes) of grey 8-bit rows."""
    path = _random_png(tmp_path / "x.png", colour, depth, size, False, after=(chunk(b"tEXt", b"Comment\0hi"),))
    data, rebuilt, size_, mode = _stored_of(path)
    assert rebuilt is not None
    original, chunks = _chunks(data), _chunks(rebuilt)
    assert [c for c in original if c[0] != b"IDAT"] == [c for c in chunks if c[0] != b"IDAT"]
    assert [kind for kind, _ in chunks].count(b"IDAT") == 1
    assert chunks.index(next(c for c in chunks if c[0] == b"IDAT")) == [k for k, _ in original].index(b"IDAT")
    body = next(body for kind, body in chunks if kind == b"IDAT")
    assert zlib.decompress(body) == zlib.decompress(b"".join(b for kind, b in original if kind == b"IDAT"))
    blocks, position = [], 2
    while position < len(body) - 4:  # every block stored, the last one final
        final, length, complement = struct.unpack_from("<BHH", body, position)
        assert complement == length ^ 0xFFFF and 0 < length <= 65535
        blocks.append((final, length))
        position += 5 + length
    assert position == len(body) - 4 and [final for final, _ in blocks] == [0] * (len(blocks) - 1) + [1]
    expected = _libspng_strict(data, size_, mode)
    assert expected is not None
    assert np.array_equal(_libspng_strict(rebuilt, size_, mode), expected)
    library = harness.pipeline.png.LIBSPNG
    assert library is not None and np.array_equal(library.load(rebuilt, size_, mode, checked=True), expected)
    with Image.open(io.BytesIO(rebuilt)) as image:
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))


def _png_of(body: bytes, size: tuple[int, int] = (4, 3), *extra: bytes, split: bool = False) -> bytes:
    width, height = size
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = [chunk(b"IDAT", body[:3]), *extra, chunk(b"IDAT", body[3:])] if split else [chunk(b"IDAT", body), *extra]
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(idat) + chunk(b"IEND", b"")


ROWS = b"".join(b"\0" + bytes([row] * 4) for row in range(3))  # 3 rows of 4 grey pixels, filter None


def _adler_broken(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 1])


@pytest.mark.parametrize(
    "data",
    [
        _png_of(zlib.compress(ROWS) + b"junk"),  # data after the stream's end
        _png_of(zlib.compress(ROWS + b"\0")),  # one byte more than the rows
        _png_of(zlib.compress(ROWS[:-1])),  # one byte fewer
        _png_of(zlib.compress(ROWS)[:-6]),  # the stream cut short
        _png_of(_adler_broken(zlib.compress(ROWS))),
        _png_of(zlib.compress(ROWS, wbits=-15)),  # raw deflate: no zlib header
        _png_of(zlib.compress(ROWS), (4, 3), chunk(b"tEXt", b"a\0b"), split=True),  # image data in two runs
        _png_of(zlib.compress(ROWS))[:-12],  # no IEND
        _png_of(zlib.compress(ROWS))[:-12] + bytes(11),  # less than a chunk after the last
        _png_of(zlib.compress(ROWS))[:-13],  # the last chunk cut short
        _png_of(zlib.compress(ROWS))[:-1] + b"\1",  # IEND's CRC wrong
        _png_of(zlib.compress(ROWS), (4, 3), _bad_crc(b"tEXt", b"a\0b")),  # another chunk's
        _png_of(zlib.compress(ROWS)).replace(zlib.compress(ROWS)[:8], zlib.compress(ROWS)[:7] + b"\0", 1),
        _png_of(zlib.compress(ROWS), (4, 3), struct.pack(">I4s", 2**32 - 16, b"tEXt")),  # a length past the end
    ],
    ids=[
        "data-after",
        "longer",
        "shorter",
        "cut-stream",
        "adler",
        "raw-deflate",
        "two-runs",
        "no-iend",
        "eleven-bytes",
        "cut-chunk",
        "iend-crc",
        "text-crc",
        "idat-crc",
        "length-past-the-end",
    ],
)
def test_stored_leaves_every_file_it_is_not_sure_of_to_libspng(data: bytes) -> None:
    """A file whose image data or chunks libspng or zlib could judge otherwise is not rebuilt: libspng decodes it
    as it is, with its own checks (the same file made right is rebuilt, so each case tests its one change)."""
    assert harness.pipeline.png.stored(_png_of(zlib.compress(ROWS)), (4, 3), 8, 0) is not None
    assert harness.pipeline.png.stored(_png_of(zlib.compress(ROWS), (4, 3), chunk(b"tEXt", b"a\0b")), (4, 3), 8, 0)
    assert harness.pipeline.png.stored(data, (4, 3), 8, 0) is None


def test_stored_leaves_interlaced_large_and_every_file_without_zlib_ng_to_libspng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adam7's data has no one length; past STORED_LIMIT the copies cost more than they save; without zlib-ng
    libspng inflates. Each one still decodes to Pillow's pixels."""
    interlaced = _random_png(tmp_path / "i.png", 2, 8, (20, 10), True)
    assert _stored_of(interlaced)[1] is None
    path = _random_png(tmp_path / "x.png", 2, 8, (20, 10), False)
    monkeypatch.setattr(harness.pipeline.png, "STORED_LIMIT", 20 * (1 + 30))
    assert _stored_of(path)[1] is not None
    monkeypatch.setattr(harness.pipeline.png, "STORED_LIMIT", 20 * (1 + 30) - 1)
    assert _stored_of(path)[1] is None
    monkeypatch.setattr(harness.pipeline.png, "STORED_LIMIT", 2**30)
    monkeypatch.setattr(harness.pipeline.png, "zlib_ng", None)
    assert _stored_of(path)[1] is None
    for each in (interlaced, path):
        assert np.array_equal(np.asarray(decode(str(each))), _pillow(each))


def test_libspng_is_spared_the_checks_only_of_a_rebuilt_file(tmp_path: Path) -> None:
    """`checked` turns off libspng's CRC and checksum, which `stored` did on the original: a rebuilt file with
    either made wrong decodes with it and is refused without it. (libspng checks no CRC of the last IDAT, whose end
    it need not read: `stored` checks every one.)"""
    data, rebuilt, size, mode = _stored_of(_random_png(tmp_path / "x.png", 6, 8, (20, 10), False))
    assert rebuilt is not None
    start = rebuilt.index(b"IDAT")
    length = struct.unpack_from(">I", rebuilt, start - 4)[0]
    library = harness.pipeline.png.LIBSPNG
    assert library is not None
    expected = library.load(data, size, mode)
    for at in (start + 4 + length - 1, 8 + 8 + 13):  # the Adler-32's last byte, IHDR's CRC's first
        wrong = bytearray(rebuilt)
        wrong[at] ^= 1
        assert np.array_equal(library.load(bytes(wrong), size, mode, checked=True), expected)
        assert library.load(bytes(wrong), size, mode) is None


def test_a_png_is_decoded_from_its_rebuilt_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One libspng decode a file, of the rebuilt file, with the checks `stored` made spared."""
    path = _random_png(tmp_path / "x.png", 6, 8, (20, 10), False)
    library = harness.pipeline.png.LIBSPNG
    assert library is not None
    calls: list[tuple[bytes, bool]] = []
    load = library.load

    def counted(data: bytes, size: tuple[int, int], mode: str, checked: bool = False) -> np.ndarray | None:
        calls.append((data, checked))
        return load(data, size, mode, checked)

    monkeypatch.setattr(library, "load", counted)
    png = open_png(str(path), DEFAULT)
    assert png is not None and np.array_equal(png.pixels(), np.asarray(Image.open(path)))
    assert calls == [(_stored_of(path)[1], True)]


def test_stored_holds_no_more_than_the_rows_of_a_deflate_bomb() -> None:
    """Image data that inflates to 8 MB for 15 bytes of rows: refused with at most the rows' length inflated."""
    import tracemalloc

    bomb = _png_of(zlib.compress(bytes(8 * 2**20), 9))
    tracemalloc.start()
    try:
        assert harness.pipeline.png.stored(bomb, (4, 3), 8, 0) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_a_rebuilt_file_libspng_refuses_is_decoded_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuilt file is a speed-up only: should libspng refuse it, the original is decoded with every check."""
    path = _random_png(tmp_path / "x.png", 6, 8, (20, 10), False)
    monkeypatch.setattr(harness.pipeline.png, "stored", lambda *args: b"\x89PNG\r\n\x1a\nnot a png")
    assert np.array_equal(np.asarray(decode(str(path))), _pillow(path))


def test_the_objectnet_samples_are_rebuilt() -> None:
    """The speed-up reaches the challenge's own files (RGBA, text after the image data)."""
    for path in sorted(SAMPLES.glob("*.png")):
        data = path.read_bytes()
        if data[25] == 6 and struct.unpack_from(">II", data, 16)[0] < 1000:
            assert _stored_of(path)[1] is not None, path.name
