"""PNG files decoded by libspng (the pyspng package): about twice Pillow's speed on photographs, and ObjectNet is
all PNG.

Taken only where the result is exactly Pillow's under the run's DecodeOptions. Pillow still reads the header, so a
file it refuses there is refused in its own words; and every file this module is not sure of goes back to Pillow
whole: transparency kept aside (tRNS, which libspng as pyspng calls it ignores) when it is composited, 16-bit grey
unless it is scaled (libspng keeps the high byte where Pillow's convert clips), animation, orientation metadata
when exif_transpose is on (Pillow rotates by it), chunks after the image data that Pillow would parse (and could
fail on), damaged image data (libspng, as pyspng sets it up, checks neither CRCs nor the zlib checksum, so the CRCs
are checked here), anything libspng rejects, and every file when pyspng is not installed.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, PngImagePlugin

if TYPE_CHECKING:
    from harness.pipeline.decode_options import DecodeOptions

try:
    import pyspng
except ImportError:  # a speed-up only: Pillow decodes every file without it
    pyspng = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (bit depth, colour type) -> the pixels pyspng is asked for: libspng scales low bit depths to 0..255 (as Pillow
# unpacks them) and cuts 16 bits to their high byte (as Pillow does for colour and alpha, and sixteen_bit: scale for
# grey); grey with alpha comes as RGBA, whose alpha framed_rgb drops or composites as to_rgb does Pillow's LA.
FORMATS = {
    (1, 0): "L",
    (2, 0): "L",
    (4, 0): "L",
    (8, 0): "L",
    (16, 0): "RGB",
    (8, 2): "RGB",
    (16, 2): "RGB",
    (1, 3): "RGB",
    (2, 3): "RGB",
    (4, 3): "RGB",
    (8, 3): "RGB",
    (8, 4): "RGBA",
    (16, 4): "RGBA",
    (8, 6): "RGBA",
    (16, 6): "RGBA",
}
# Pillow's Image.getexif() reads an orientation from any of these (eXIf chunk, ImageMagick text, XMP)
ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


class FastPng:
    """A PNG that libspng decodes to Pillow's pixels: its bytes, size and IHDR's depth and colour type."""

    def __init__(self, data: bytes, size: tuple[int, int], depth: int, colour: int) -> None:
        self.data = data
        self.size = size
        self.depth = depth
        self.colour = colour

    def pixels(self) -> np.ndarray | None:
        """H x W (grey), H x W x 3 or H x W x 4 uint8, which `decode.framed_rgb` turns into exactly the RGB
        `decode.to_rgb` makes of Pillow's image; None when libspng cannot decode the file (Pillow then decodes it,
        or says why not)."""
        try:
            return pyspng.load(self.data, FORMATS[(self.depth, self.colour)])
        except RuntimeError:
            return None


def open_png(path: str, options: DecodeOptions) -> FastPng | None:
    """The file as a FastPng, or None when Pillow is to decode it: not a PNG, not pyspng's to take under `options`,
    or unreadable here (Pillow then raises its own error for it)."""
    if pyspng is None:
        return None
    try:
        with open(path, "rb") as f:
            if f.read(len(SIGNATURE)) != SIGNATURE:
                return None
            data = SIGNATURE + f.read()
    except OSError:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as header:  # the header only: no pixel is decoded
            info, tile, size, frames = header.info, header.tile, header.size, getattr(header, "n_frames", 1)
            text_memory = header.png.text_memory  # text read so far, which Pillow caps at MAX_TEXT_MEMORY
    except Exception:  # whatever Pillow refuses, it refuses again from the path, in its own words
        return None
    # one image, the whole canvas (an animation's first frame may cover only part of it)
    if data[12:16] != b"IHDR" or frames != 1 or len(tile) != 1 or tuple(tile[0][1]) != (0, 0, *size):
        return None
    depth, colour = data[24], data[25]
    if (depth, colour) not in FORMATS or ((depth, colour) == (16, 0) and options.sixteen_bit != "scale"):
        return None
    if "transparency" in info and options.background is not None:
        return None
    if options.exif_transpose and any(key in info for key in ORIENTATION_KEYS):
        return None
    if not _pillow_reads_nothing_after(data, tile[0][2] - 8, text_memory, options.exif_transpose):
        return None
    return FastPng(data, size, depth, colour)


def _pillow_reads_nothing_after(data: bytes, position: int, text_memory: int, exif_transpose: bool) -> bool:
    """From the first IDAT (at `position`) on, nothing Pillow would decode differently or fail on: more image data,
    each chunk whole and its CRC right (libspng as pyspng sets it up checks neither the CRCs nor the zlib checksum,
    and Pillow fails on damage the checksum finds); text that carries no orientation and stays within Pillow's text
    memory (Pillow reads what follows the image data once the pixels are in, and ObjectNet's files keep their text
    there); chunks Pillow has no reader for; up to IEND, or what Pillow takes for the end."""
    view = memoryview(data)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND" or not PngImagePlugin.is_cid(kind):  # no chunk type: where Pillow stops reading
            return True
        end = position + 8 + length
        if end + 4 > len(data):
            return False  # cut short: Pillow decides what that costs
        if kind == b"IDAT":
            if zlib.crc32(view[position + 8 : end], zlib.crc32(kind)) != struct.unpack_from(">I", data, end)[0]:
                return False
        elif kind == b"tEXt":
            keyword, _, text = data[position + 8 : end].partition(b"\0")
            text_memory += len(text) if keyword else 0
            orientation = exif_transpose and keyword.decode("latin-1") in ORIENTATION_KEYS
            if orientation or text_memory > PngImagePlugin.MAX_TEXT_MEMORY:
                return False
        elif hasattr(PngImagePlugin.PngStream, f"chunk_{kind.decode('ascii')}"):
            return False
        position = end + 4
    return True
