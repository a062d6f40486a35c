"""Decoding one file to RGB within the run's limits (pixels, time), and stripping the frame around it: the work of
every decoder, the DataLoader's workers and the head start's alike."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, ImageOps

from harness.errors import describe_user_error

if TYPE_CHECKING:
    from harness.config import Config, Preprocess

AUTO_BORDER_MAX = 8  # widest frame `auto` will strip, in pixels
AUTO_BORDER_TOLERANCE = 40  # per-channel distance from the frame colour still counted as frame (JPEG smear)
T = TypeVar("T")
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

# The harness enforces its own, configurable pixel cap in `load_rgb` (from the header, before any pixel is
# decoded); Pillow's process-wide one would warn below it and raise above twice it, whatever the setting says.
Image.MAX_IMAGE_PIXELS = None


class ImageTooLarge(Exception):
    """More pixels than max_pixels: refused before decoding, as a decompression bomb would be."""


def load_rgb(path: str, exif_transpose: bool = True, max_pixels: int | None = None) -> Image.Image:
    """Decode one file to an 8-bit RGB image, whatever its mode.

    Transparent pixels are composited onto white, as an image viewer shows them; 16-bit images are scaled to
    8 bits rather than clipped; animated and multi-page files give their first frame.
    """
    return decode(path, exif_transpose, max_pixels=max_pixels)[0]


def decode(
    path: str, exif_transpose: bool = True, draft_to: int | None = None, max_pixels: int | None = None
) -> tuple[Image.Image, float]:
    """`load_rgb`, and the scale it decoded at: with `draft_to`, a JPEG whose sides both reach twice that decodes
    at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode), its sides still >= `draft_to`.
    `max_pixels` is checked on the file's own size, before any drafting or decoding."""
    with Image.open(path) as opened:
        if max_pixels is not None and opened.width * opened.height > max_pixels:
            raise ImageTooLarge(f"{opened.width}x{opened.height} pixels is more than max_pixels ({max_pixels})")
        full_width = opened.width
        if draft_to is not None and opened.format == "JPEG" and min(opened.size) >= 2 * draft_to:
            opened.draft("RGB", (draft_to, draft_to))
        scale = opened.width / full_width
        opened.load()
        image = ImageOps.exif_transpose(opened) if exif_transpose else opened
        rgb = to_rgb(image)
        # Leaving the `with` closes `opened`, which would invalidate it if it were also the result.
        return (rgb.copy() if rgb is opened else rgb), scale


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if values.size and float(values.max()) <= 1.0 else 255.0
        scaled = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] == 255:
            return rgba.convert("RGB")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def strip_border(image: Image.Image, border: int | str) -> Image.Image:
    """Remove a frame: `border` pixels from each side, or with "auto" exactly the uniform frame found.

    An image too small to lose that many pixels is returned whole: a row for it beats an empty crop.
    """
    width = border if isinstance(border, int) else detect_border(image)
    if width <= 0 or image.width <= 2 * width or image.height <= 2 * width:
        return image
    return image.crop((width, width, image.width - width, image.height - width))


def detect_border(image: Image.Image, limit: int = AUTO_BORDER_MAX, tolerance: int = AUTO_BORDER_TOLERANCE) -> int:
    """Width of the solid-colour frame around an RGB image: rings of pixels, outermost first, that all match the
    colour of the outermost ring. Letterbox bars inside a frame of another colour are not frame."""
    pixels = np.asarray(image, dtype=np.int16)
    height, width = pixels.shape[:2]
    limit = min(limit, (min(height, width) - 1) // 2)
    colour = None
    for k in range(limit):
        ring = np.concatenate(
            [
                pixels[k, k : width - k],
                pixels[height - 1 - k, k : width - k],
                pixels[k : height - k, k],
                pixels[k : height - k, width - 1 - k],
            ]
        )
        if colour is None:
            colour = np.median(ring, axis=0)
        if np.abs(ring - colour).max() > tolerance:
            return k
    return limit


class DecodeTimeout(Exception):
    """One image took longer than decode_timeout: skipped so a pathological file cannot stall the run."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise DecodeTimeout in this thread after `seconds` (SIGALRM: only in a process's main thread)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise DecodeTimeout(f"decoding took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int | None = None
    timeout: float | None = None

    @classmethod
    def of(cls, config: Config) -> DecodeLimits:
        """The run's limits, so every path that decodes (run, head start, benchmark, export parity) refuses the
        same files."""
        return cls(config.max_pixels, config.decode_timeout)


def decode_sample(
    path: str, pre: Preprocess, limits: DecodeLimits, draft_to: int | None, transform: Callable[[Image.Image], T]
) -> tuple[T | None, str]:
    """One file through decode, frame strip and `transform`, within the limits: the work of every decoder (the
    DataLoader's workers and the head start's), so both give the same pixels and the same reasons. Returns the
    sample and "", or None and why the file failed: one bad file must cost one row, never the run."""
    try:
        with time_limit(limits.timeout):
            image, scale = decode(path, pre.exif_transpose, draft_to, limits.max_pixels)
            border = pre.border
            if isinstance(border, int) and scale != 1:  # the frame shrank with the image; take all it touches
                border = math.ceil(border * scale)
            return transform(strip_border(image, border)), ""
    except Exception as error:
        return None, describe_user_error(error)
