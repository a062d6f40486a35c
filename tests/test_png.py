"""PNGs decoded by libspng (harness/pipeline/png.py) give exactly Pillow's RGB: the sample images, the shared
ObjectNet samples, and generated files of every colour type and bit depth, interlaced or not, with and without
transparency, tiny, and with the metadata Pillow rotates by. A file libspng does not take is Pillow's, errors
included."""

from __future__ import annotations

import contextlib
import random
import struct
import tempfile
import time
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
from harness.pipeline.decode import DecodeLimits, ImageTooLarge, decode, decode_sample
from harness.pipeline.png import open_png
from tests.helpers import SAMPLES

pytest.importorskip("pyspng")

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filtered(rows: list[bytes], step: int, rng: random.Random) -> bytes:
    """Scanlines each under a random one of the five PNG filters, so both decoders' unfiltering is exercised."""
    out, previous = bytearray(), bytes(len(rows[0]) if rows else 0)
    for row in rows:
        kind = rng.randrange(5)
        line = bytearray([kind])
        for i, x in enumerate(row):
            a = row[i - step] if i >= step else 0
            b = previous[i]
            c = previous[i - step] if i >= step else 0
            predictor = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
            line.append((x - predictor) % 256)
        out += line
        previous = row
    return bytes(out)


def _scanlines(samples: np.ndarray, depth: int) -> list[bytes]:
    """Rows of H x W x C samples packed at `depth` bits, big-endian, each row padded to a whole byte."""
    if depth == 16:
        return [row.astype(">u2").tobytes() for row in samples]
    if depth == 8:
        return [row.astype(np.uint8).tobytes() for row in samples]
    rows = []
    for row in samples.reshape(samples.shape[0], -1):
        bits = np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :].reshape(-1)
        rows.append(np.packbits(bits).tobytes())
    return rows


def write_png(
    path: Path,
    samples: np.ndarray,
    colour: int,
    depth: int,
    *,
    interlace: bool = False,
    palette: np.ndarray | None = None,
    before: tuple[bytes, ...] = (),
    after: tuple[bytes, ...] = (),
    seed: int = 0,
) -> Path:
    """A PNG of H x W x C `samples` (palette indices for colour type 3), every filter type used, Adam7 when asked;
    `before` and `after` are extra chunks around the image data."""
    rng = random.Random(seed)
    height, width = samples.shape[:2]
    step = max(1, CHANNELS[colour] * depth // 8)
    if interlace:
        passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
        raw = b"".join(_filtered(_scanlines(p, depth), step, rng) for p in passes if p.size)
    else:
        raw = _filtered(_scanlines(samples, depth), step, rng)
    body = zlib.compress(raw)
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace)))]
    if palette is not None:
        chunks.append(_chunk(b"PLTE", palette.astype(np.uint8).tobytes()))
    chunks += list(before)
    chunks += [_chunk(b"IDAT", body[: len(body) // 2]), _chunk(b"IDAT", body[len(body) // 2 :])]
    chunks += [*after, _chunk(b"IEND", b"")]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    return path


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
    saved = harness.pipeline.png.pyspng
    harness.pipeline.png.pyspng = None
    try:
        yield
    finally:
        harness.pipeline.png.pyspng = saved


def _pillow(path: Path, exif_transpose: bool = True, border: int | str = 0) -> np.ndarray:
    with pillow_alone():
        return np.asarray(decode(str(path), exif_transpose, border=border))


def _assert_libspng_gives_pillows_rgb(path: Path) -> None:
    """Frame stripped or not, found or not, and wider than a tiny image allows."""
    png = open_png(str(path), exif_transpose=True)
    assert png is not None and png.pixels() is not None, f"{path.name} did not take the libspng path"
    for border in (0, 2, "auto", 5):
        image = decode(str(path), border=border)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), _pillow(path, border=border)), (path.name, border)


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
        return _chunk(b"tRNS", bytes([0, 128, 255]))
    return _chunk(b"tRNS", struct.pack(">HHH" if colour == 2 else ">H", *([1] * (3 if colour == 2 else 1))))


EXIF_ROTATED = Image.Exif()
EXIF_ROTATED[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view


@pytest.mark.parametrize(
    ("name", "colour", "depth", "extra", "exif_transpose"),
    [
        ("palette-trns", 3, 4, {"before": (_trns(3, 4),)}, True),
        ("grey-trns", 0, 8, {"before": (_trns(0, 8),)}, True),
        ("rgb-trns", 2, 8, {"before": (_trns(2, 8),)}, True),
        ("exif-before", 2, 8, {"before": (_chunk(b"eXIf", EXIF_ROTATED.tobytes()),)}, True),
        ("exif-after", 2, 8, {"after": (_chunk(b"eXIf", EXIF_ROTATED.tobytes()),)}, True),
        ("exif-text-after", 2, 8, {"after": (_chunk(b"tEXt", b"Raw profile type exif\0exif"),)}, True),
        ("ztxt-after", 2, 8, {"after": (_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"written last")),)}, True),
        ("xmp", 2, 8, {"before": (_chunk(b"iTXt", b'XML:com.adobe.xmp\0\0\0\0\0<x tiff:Orientation="6"/>'),)}, True),
    ],
)
def test_what_libspng_does_not_take_is_pillows(
    tmp_path: Path, name: str, colour: int, depth: int, extra: dict, exif_transpose: bool
) -> None:
    path = _random_png(tmp_path / f"{name}.png", colour, depth, (6, 11), False, **extra)
    assert open_png(str(path), exif_transpose) is None
    assert np.array_equal(np.asarray(decode(str(path), exif_transpose)), _pillow(path, exif_transpose))


def test_pillow_rotates_by_a_pngs_exif_and_so_does_the_harness(tmp_path: Path) -> None:
    path = _random_png(tmp_path / "r.png", 2, 8, (6, 11), False, after=(_chunk(b"eXIf", EXIF_ROTATED.tobytes()),))
    assert decode(str(path)).size == (6, 11) and decode(str(path), exif_transpose=False).size == (11, 6)


def test_orientation_metadata_is_libspngs_when_exif_transpose_is_off(tmp_path: Path) -> None:
    path = _random_png(tmp_path / "r.png", 2, 8, (6, 11), False, before=(_chunk(b"eXIf", EXIF_ROTATED.tobytes()),))
    assert open_png(str(path), exif_transpose=False) is not None
    assert np.array_equal(np.asarray(decode(str(path), False)), _pillow(path, False))


def _outcome(path: Path) -> tuple[np.ndarray | None, str]:
    return decode_sample(str(path), Preprocess(border=0), DecodeLimits(), None, np.asarray)


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
    monkeypatch.setattr(harness.pipeline.png, "pyspng", None)
    assert open_png(str(SAMPLES / "coffee.png"), True) is None
    assert decode(str(SAMPLES / "coffee.png")).size == (600, 400)


def test_the_decode_timeout_stops_libspng_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode that outlasts decode_timeout is a failure row, not handed to Pillow for another try."""

    class Stuck:
        @staticmethod
        def load(data: bytes, format: str) -> None:
            time.sleep(30)

    monkeypatch.setattr(harness.pipeline.png, "pyspng", Stuck)
    started = time.monotonic()
    image, reason = decode_sample(
        str(SAMPLES / "coffee.png"), Preprocess(), DecodeLimits(timeout=0.5), None, np.asarray
    )
    assert image is None and reason.startswith("DecodeTimeout") and time.monotonic() - started < 5
