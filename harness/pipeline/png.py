"""PNG files decoded by libspng (the one the pyspng package carries): about twice Pillow's speed on photographs, and
ObjectNet is all PNG.

Taken only where the result is exactly Pillow's under the run's DecodeOptions. Pillow still reads the header, so a
file it refuses there is refused in its own words; and every file this module is not sure of goes back to Pillow
whole: transparency kept aside (tRNS, which libspng as called here ignores) when it is composited, 16-bit grey
unless it is scaled (libspng keeps the high byte where Pillow's convert clips), animation, orientation metadata
when exif_transpose is on (Pillow rotates by it), chunks after the image data that Pillow would parse (and could
fail on), anything libspng rejects, and every file when pyspng is not installed.

Damage is refused as Pillow refuses it, by construction: libspng is called here directly (through ctypes, on the
library pyspng ships) with its checks on, every chunk's CRC and the image data's zlib checksum, where pyspng's own
`load` turns both off; a file that fails them goes back to Pillow, which says why.

The image data is inflated by zlib-ng where it is installed: the zlib that pyspng builds into libspng (1.2.11)
spends most of libspng's time, and zlib-ng's inflate is the same state machine rewritten for speed (its figures:
docs/benchmarks.md). libspng cannot be handed another inflate, so `stored` hands it the same file with the image
data inflated and stored uncompressed, after checking every chunk's CRC and the checksum itself; libspng then only
unfilters, and gives the pixels it gives the original.
"""

from __future__ import annotations

import ctypes
import io
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, PngImagePlugin

if TYPE_CHECKING:
    from harness.pipeline.decode_options import DecodeOptions

try:
    import pyspng._pyspng_c as _pyspng
except ImportError:  # a speed-up only: Pillow decodes every file without it
    _pyspng = None
try:
    from zlib_ng import zlib_ng
except ImportError:  # a speed-up only: libspng inflates with its own zlib without it
    zlib_ng = None

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


SPNG_FORMATS = {"L": (64, 1), "RGB": (4, 3), "RGBA": (1, 4)}  # libspng's spng_format and its channels
SPNG_CRC_ERROR = 0  # spng_crc_action: a chunk whose CRC is wrong is an error (critical and ancillary alike)
# spng_crc_action: no CRC computed and, for the image data, no checksum either (libspng ties the two), for a file
# `stored` made from one whose CRCs and checksum it checked
SPNG_CRC_USE = 2
CHUNK_LIMIT = 64 * 2**20  # bytes of chunks libspng keeps, as pyspng limits them
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each colour type
STORED_BLOCK = 65535  # the most bytes a stored deflate block holds
# Filtered image data above this is left to libspng's own inflate: past it the copies `stored` makes cost more
# than the faster inflate saves on this kind of machine (docs/benchmarks.md), and it bounds the memory they take.
STORED_LIMIT = 8 * 2**20


class Libspng:
    """libspng's decoder through ctypes, on the library pyspng ships: every CRC and the zlib checksum checked."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.new, self.free = library.spng_ctx_new, library.spng_ctx_free
        self.new.restype, self.new.argtypes = ctypes.c_void_p, [ctypes.c_int]
        self.free.argtypes = [ctypes.c_void_p]
        calls = {
            "spng_set_crc_action": [ctypes.c_void_p, ctypes.c_int, ctypes.c_int],
            "spng_set_chunk_limits": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
            "spng_set_png_buffer": [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t],
            "spng_decoded_image_size": [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)],
            "spng_decode_image": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int],
        }
        for name, argtypes in calls.items():
            function = getattr(library, name)
            function.restype, function.argtypes = ctypes.c_int, argtypes
            setattr(self, name, function)

    def load(self, data: bytes, size: tuple[int, int], mode: str, checked: bool = False) -> np.ndarray | None:
        """H x W (x C) uint8 pixels, or None when libspng refuses the file (a wrong CRC or checksum included).
        `checked`: the file is one `stored` made, whose CRCs and checksum it checked on the original's data."""
        fmt, channels = SPNG_FORMATS[mode]
        ctx = self.new(0)
        if not ctx:
            return None
        crc_action = SPNG_CRC_USE if checked else SPNG_CRC_ERROR
        try:
            length = ctypes.c_size_t()
            steps = (
                lambda: self.spng_set_crc_action(ctx, crc_action, crc_action),
                lambda: self.spng_set_chunk_limits(ctx, CHUNK_LIMIT, CHUNK_LIMIT),
                lambda: self.spng_set_png_buffer(ctx, data, len(data)),
                lambda: self.spng_decoded_image_size(ctx, fmt, ctypes.byref(length)),
            )
            if any(step() != 0 for step in steps):
                return None
            width, height = size
            shape = (height, width) if channels == 1 else (height, width, channels)
            pixels = np.empty(shape, dtype=np.uint8)
            if pixels.nbytes != length.value:
                return None
            if self.spng_decode_image(ctx, pixels.ctypes.data, length.value, fmt, 0) != 0:
                return None
            return pixels
        finally:
            self.free(ctx)


def _libspng() -> Libspng | None:
    if _pyspng is None:
        return None
    try:
        return Libspng(ctypes.CDLL(_pyspng.__file__))
    except (OSError, AttributeError):  # another build of pyspng that hides libspng's symbols: Pillow decodes
        return None


LIBSPNG = _libspng()


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
        assert LIBSPNG is not None
        mode = FORMATS[(self.depth, self.colour)]
        inflated = stored(self.data, self.size, self.depth, self.colour)
        pixels = None if inflated is None else LIBSPNG.load(inflated, self.size, mode, checked=True)
        return LIBSPNG.load(self.data, self.size, mode) if pixels is None else pixels


def stored(data: bytes, size: tuple[int, int], depth: int, colour: int) -> bytes | None:
    """The PNG `data` with its image data inflated by zlib-ng and stored (deflate's uncompressed blocks) in one
    IDAT, every other chunk as it was; or None, for libspng to decode `data` as it is: zlib-ng not installed, an
    interlaced image (its data's length is not one product), more than STORED_LIMIT bytes, or anything libspng
    could judge otherwise, a chunk cut short or whose CRC is wrong, no IEND, image data in two runs, a stream
    zlib-ng refuses (its checksum included) or that does not end exactly where the image data and the chunks do.
    The result carries a right CRC and checksum, so any decoder takes it as the same image."""
    width, height = size
    expected = height * (1 + (width * CHANNELS[colour] * depth + 7) // 8)  # a filter byte and the samples per row
    if zlib_ng is None or data[28] != 0 or expected > STORED_LIMIT:
        return None
    view = memoryview(data)
    position, first, last, parts = len(SIGNATURE), 0, 0, []
    while True:
        if position + 12 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 8 + length
        if end + 4 > len(data) or zlib_ng.crc32(view[position + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            return None
        if kind == b"IDAT":
            if parts and last != position:
                return None
            first = first if parts else position
            parts.append(view[position + 8 : end])
            last = end + 4
        position = end + 4
        if kind == b"IEND":
            break
    stream = zlib_ng.decompressobj()
    try:
        raw = stream.decompress(b"".join(parts), expected + 1)
    except zlib_ng.error:
        return None
    if not stream.eof or stream.unused_data or len(raw) != expected:
        return None
    inflated, body = memoryview(raw), [b"\x78\x01"]  # deflate, a 32 KB window, no dictionary
    for start in range(0, expected, STORED_BLOCK):
        block = inflated[start : start + STORED_BLOCK]
        final = start + STORED_BLOCK >= expected
        body += [struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF), block]
    body.append(struct.pack(">I", zlib_ng.adler32(raw)))
    crc = zlib_ng.crc32(b"IDAT")
    for piece in body:
        crc = zlib_ng.crc32(piece, crc)
    header = struct.pack(">I4s", sum(len(piece) for piece in body), b"IDAT")
    return b"".join([view[:first], header, *body, struct.pack(">I", crc), view[last:]])


def open_png(path: str, options: DecodeOptions) -> FastPng | None:
    """The file as a FastPng, or None when Pillow is to decode it: not a PNG, not pyspng's to take under `options`,
    or unreadable here (Pillow then raises its own error for it)."""
    if LIBSPNG is None:
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
    """From the first IDAT (at `position`) on, nothing Pillow would decode differently or fail on: more image data
    (whose CRCs and checksum libspng checks), each chunk whole and every other chunk's CRC right; text that carries
    no orientation and stays within Pillow's text memory (Pillow reads what follows the image data once the pixels
    are in, and ObjectNet's files keep their text there); chunks Pillow has no reader for; up to IEND, or what
    Pillow takes for the end."""
    view = memoryview(data)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND" or not PngImagePlugin.is_cid(kind):  # no chunk type: where Pillow stops reading
            return True
        end = position + 8 + length
        if end + 4 > len(data):
            return False  # cut short: Pillow decides what that costs
        if kind == b"IDAT":  # libspng checks the image data's CRCs and its checksum
            position = end + 4
            continue
        if zlib.crc32(view[position + 8 : end], zlib.crc32(kind)) != struct.unpack_from(">I", data, end)[0]:
            return False
        if kind == b"tEXt":
            keyword, _, text = data[position + 8 : end].partition(b"\0")
            text_memory += len(text) if keyword else 0
            orientation = exif_transpose and keyword.decode("latin-1") in ORIENTATION_KEYS
            if orientation or text_memory > PngImagePlugin.MAX_TEXT_MEMORY:
                return False
        elif hasattr(PngImagePlugin.PngStream, f"chunk_{kind.decode('ascii')}"):
            return False
        position = end + 4
    return True
