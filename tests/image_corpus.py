"""A corpus of real images in every mode a participant's folder may hold, written into a folder by `write_corpus`:
each derived from the sample photographs (cropped, converted, given an alpha channel from another photograph's
light), so that a decoder that treats a mode wrongly changes real pixels, not a flat colour. Also the one PNG
writer of the tests (`write_png`), for what Pillow cannot write: 16-bit colour, Adam7 interlacing, chunks placed
at will."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import SAMPLES

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def chunk(kind: bytes, body: bytes) -> bytes:
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
    chunks = [chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace)))]
    if palette is not None:
        chunks.append(chunk(b"PLTE", palette.astype(np.uint8).tobytes()))
    chunks += list(before)
    chunks += [chunk(b"IDAT", body[: len(body) // 2]), chunk(b"IDAT", body[len(body) // 2 :])]
    chunks += [*after, chunk(b"IEND", b"")]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    return path


ORIENTATION = 0x0112  # the EXIF tag: 6 is "rotate 90 degrees clockwise to view"
LARGE = (3000, 2000)


def photo_crop(name: str, size: tuple[int, int], left: int = 0, top: int = 0) -> Image.Image:
    """A width x height RGB crop of a sample photograph."""
    with Image.open(SAMPLES / name) as image:
        return image.convert("RGB").crop((left, top, left + size[0], top + size[1]))


def light(size: tuple[int, int]) -> Image.Image:
    """An alpha channel with every level from clear to opaque: the light of another photograph."""
    return photo_crop("astronaut.png", size, 100, 60).convert("L")


def _animated_png(path: Path, first: Image.Image) -> None:
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)


def write_corpus(folder: Path, large: bool = True) -> dict[str, Path]:
    """Every mode the harness must decode as `Image.open(path).convert("RGB")` does, by name, written into
    `folder`; the sample photographs included. `large` adds a 3000 x 2000 photograph (slow to write and read)."""
    folder.mkdir(parents=True, exist_ok=True)
    size = (96, 64)
    photo = photo_crop("coffee.png", size, 200, 150)
    grey = photo.convert("L")
    alpha = light(size)
    made: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **options: object) -> None:
        made[name] = folder / name
        image.save(made[name], **options)

    rgba = photo.copy()
    rgba.putalpha(alpha)
    save("rgba-partial.png", rgba)
    grey_alpha = grey.convert("LA")
    grey_alpha.putalpha(alpha)
    save("la.png", grey_alpha)
    save("1bit.png", grey.convert("1"))
    save("grey.png", grey)
    save("palette.png", photo.quantize(64))
    # tRNS: a palette whose entries range from clear to opaque, a grey and a colour key
    save("palette-trns.png", photo.quantize(64), transparency=bytes(range(0, 256, 4)))
    save("grey-trns.png", grey, transparency=int(np.asarray(grey)[0, 0]))
    save("rgb-trns.png", photo, transparency=photo.getpixel((0, 0)))
    # 16 bits: the photograph in the high byte, another's light in the low one, so clipping and scaling differ
    deep = np.asarray(grey, dtype=np.uint16) * 256 + np.asarray(alpha, dtype=np.uint16)
    save("grey16.png", Image.fromarray(deep))
    save("grey16b.tif", Image.fromarray(deep).convert("I;16B"))
    save("int32.tif", Image.fromarray(deep.astype(np.int32) - 300))  # mode I, negatives and values above 255
    save("float.tif", Image.fromarray(np.asarray(grey, dtype=np.float32) / 255.0))  # mode F, 0..1
    colour16 = np.asarray(photo, dtype=np.uint16) * 256 + np.asarray(alpha, dtype=np.uint16)[..., None]
    made["rgb16.png"] = write_png(folder / "rgb16.png", colour16, 2, 16)
    rgba16 = np.dstack([colour16, np.asarray(alpha, dtype=np.uint16) * 256 + np.asarray(grey, dtype=np.uint16)])
    made["rgba16.png"] = write_png(folder / "rgba16.png", rgba16, 6, 16)
    made["interlaced.png"] = write_png(folder / "interlaced.png", np.asarray(rgba), 6, 8, interlace=True)
    save("cmyk.jpg", photo.convert("CMYK"), quality=95)
    save("grey.jpg", grey, quality=95)
    save("ycbcr.tif", photo.convert("YCbCr"))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    save("exif-rotated.jpg", photo, exif=exif, quality=95)
    save("exif-rotated-rgba.png", rgba, exif=exif)
    _animated_png(folder / "animated.png", photo)
    made["animated.png"] = folder / "animated.png"
    save("tiny-1x1.png", photo_crop("chelsea.png", (1, 1), 200, 100))
    save("tiny-3x2.png", rgba.crop((40, 30, 43, 32)))
    if large:
        with Image.open(SAMPLES / "7ee6baf1e7da4f9.png") as tall:
            save("large.png", tall.convert("RGB").resize((LARGE[1], LARGE[0])).transpose(Image.Transpose.ROTATE_90))
    for path in sorted(SAMPLES.iterdir()):
        if path.suffix in (".png", ".jpg"):
            made[path.name] = folder / path.name
            made[path.name].write_bytes(path.read_bytes())
    return made
