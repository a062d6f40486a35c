"""Decoding one file to RGB within the run's limits (pixels, time), and stripping the frame around it: the work of
every decoder, the DataLoader's workers and the head start's alike."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageOps

from harness.errors import describe_user_error
from harness.pipeline.decode_options import DEFAULT_OPTIONS, DecodeOptions, Decoding
from harness.pipeline.png import open_png
from harness.pipeline.transforms import shorter_side_to

if TYPE_CHECKING:
    from harness.config import Preprocess

AUTO_BORDER_MAX = 8  # widest frame `auto` will strip, in pixels
AUTO_BORDER_TOLERANCE = 40  # per-channel distance from the frame colour still counted as frame (JPEG smear)
T = TypeVar("T")
TURNED = range(2, 9)  # the EXIF orientations ImageOps.exif_transpose turns or flips the image for
DEEP_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})  # grey beyond 8 bits: what sixteen_bit scales
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})

# The harness enforces its own, configurable pixel cap in `decode` (from the header, before any pixel is
# decoded); Pillow's process-wide one would warn below it and raise above twice it, whatever the setting says.
Image.MAX_IMAGE_PIXELS = None


class ImageTooLarge(Exception):
    """More pixels than max_pixels: refused before decoding, as a decompression bomb would be."""


class ModelFault(Exception):
    """The model's own code (a model folder's transform) raised on an image: the model's error, not the image's."""


class ModelFailure(str):
    """Why a sample failed, when the model's code failed it (ModelFault): it crosses from a decoding process to
    the run as an image's reason does, and the run stops with the model's error (exit 4), not a failure row."""


def load_rgb(path: str, options: DecodeOptions = DEFAULT_OPTIONS, max_pixels: int | None = None) -> Image.Image:
    """Decode one file to an 8-bit RGB image, whatever its mode, as `options` say; animated and multi-page files
    give their first frame."""
    return decode(path, options, max_pixels=max_pixels)


def decode(
    path: str,
    options: DecodeOptions = DEFAULT_OPTIONS,
    draft_to: int | None = None,
    max_pixels: int | None = None,
    border: int | str = 0,
) -> Image.Image:
    """`load_rgb` with the frame stripped (`strip_border`). With `draft_to`, a JPEG whose sides both reach twice
    that decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode), its sides still >=
    `draft_to`, and its frame shrinks with it. `max_pixels` is checked on the file's own size, before any drafting
    or decoding. PNGs go to libspng where it gives Pillow's pixels (harness/pipeline/png.py), the rest to Pillow."""
    png = open_png(path, options)
    if png is not None:
        check_pixels(png.size, max_pixels)
        pixels = png.pixels()
        if pixels is not None:
            return framed_rgb(pixels, border, options)
    with Image.open(path) as opened:
        check_pixels(opened.size, max_pixels)
        full_width = opened.width
        if draft_to is not None and opened.format == "JPEG" and min(opened.size) >= 2 * draft_to:
            opened.draft("RGB", (draft_to, draft_to))
        scale = opened.width / full_width
        if isinstance(border, int) and scale != 1:  # the frame shrank with the image; take all it touches
            border = math.ceil(border * scale)
        opened.load()
        # exif_transpose copies the whole image even when there is nothing to turn: only called when there is
        turned = options.exif_transpose and opened.getexif().get(ExifTags.Base.Orientation, 1) in TURNED
        image = ImageOps.exif_transpose(opened) if turned else opened
        rgb = strip_border(to_rgb(image, options), border)
        # Leaving the `with` closes `opened`, which would invalidate it if it were also the result.
        return rgb.copy() if rgb is opened else rgb


def check_resized(size: tuple[int, int], pre: Preprocess, max_pixels: int | None) -> None:
    """Refuse an image whose resize would make more than max_pixels: a 20000 x 1 strip is small on disk, but its
    shorter side brought to 224 makes it 4,480,000 x 224 (an aspect-ratio bomb)."""
    if max_pixels is None or pre.resize_mode == "squash":
        return
    width, height = shorter_side_to(size, pre.resize_to)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"its {size[0]} x {size[1]} pixels resized to {pre.resize_to} on the shorter side would be {width} x "
            f"{height}, more than max_pixels ({max_pixels:,})"
        )


def check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLarge(f"{size[0]}x{size[1]} pixels is more than max_pixels ({max_pixels})")


def framed_rgb(pixels: np.ndarray, border: int | str, options: DecodeOptions) -> Image.Image:
    """`strip_border(to_rgb(image, options), border)` of libspng's H x W (grey), H x W x 3 or H x W x 4 pixels. A
    colour image whose alpha is dropped (or opaque) is copied once: the frame is cut and any alpha dropped as Pillow
    reads its rows."""
    has_alpha = pixels.ndim == 3 and pixels.shape[2] == 4
    if pixels.ndim == 2 or (has_alpha and options.background is not None and int(pixels[..., 3].min()) < 255):
        return strip_border(to_rgb(Image.fromarray(pixels), options), border)
    height, width, channels = pixels.shape
    cut = border_width(pixels[..., :3], border)
    # the rows start at the first pixel inside the frame and lie one source row apart
    start = (cut * width + cut) * channels
    rows = memoryview(pixels).cast("B")[start:]
    rawmode = "RGB" if channels == 3 else "RGBX"  # RGBX: Pillow's RGB ignoring the fourth byte
    return Image.frombytes("RGB", (width - 2 * cut, height - 2 * cut), rows, "raw", rawmode, width * channels, 1)


def to_rgb(image: Image.Image, options: DecodeOptions = DEFAULT_OPTIONS) -> Image.Image:
    """`image.convert("RGB")`, with the options that differ from it: deep grey scaled, transparency composited."""
    if options.sixteen_bit == "scale" and image.mode in DEEP_MODES:
        rgb = scaled_to_rgb(image)
    elif image.mode == "RGB":
        rgb = image
    elif "transparency" in image.info:
        with warnings.catch_warnings():  # Pillow warns that it drops a palette's transparency: as asked
            warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
            rgb = image.convert("RGB")
    else:
        rgb = image.convert("RGB")
    background = options.background
    if background is None or not (image.mode in ALPHA_MODES or "transparency" in image.info):
        return rgb
    # the alpha of a mode that has one, or of the transparent colour or palette entries (tRNS) Pillow keeps aside
    alpha = (image if image.mode in ALPHA_MODES else image.convert("RGBA")).getchannel("A")
    if alpha.getextrema()[0] == 255:  # opaque: compositing would give the same pixels, slower
        return rgb
    rgba = Image.merge("RGBA", (*rgb.split(), alpha))
    return Image.alpha_composite(Image.new("RGBA", rgb.size, (*background, 255)), rgba).convert("RGB")


def scaled_to_rgb(image: Image.Image) -> Image.Image:
    """Deep grey to 8 bits by scaling, not clipping: 16-bit (and 32-bit integer) values by their high byte, float
    values 0..1 (or 0..255) to 0..255."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if values.size and float(values.max()) <= 1.0 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def strip_border(image: Image.Image, border: int | str) -> Image.Image:
    """Remove a frame: `border` pixels from each side, or with "auto" exactly the uniform frame found.

    An image too small to lose that many pixels is returned whole: a row for it beats an empty crop.
    """
    width = border_width(image, border)
    if width == 0:
        return image
    return image.crop((width, width, image.width - width, image.height - width))


def border_width(image: Image.Image | np.ndarray, border: int | str) -> int:
    """The frame `strip_border` cuts from each side of an RGB image (or its H x W x 3 pixels): 0 where the image is
    too small to lose it."""
    height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
    cut = detect_border(image) if isinstance(border, str) else border
    return 0 if cut <= 0 or width <= 2 * cut or height <= 2 * cut else cut


def detect_border(
    image: Image.Image | np.ndarray, limit: int = AUTO_BORDER_MAX, tolerance: int = AUTO_BORDER_TOLERANCE
) -> int:
    """Width of the solid-colour frame around an RGB image (or its H x W x 3 pixels): rings of pixels, outermost
    first, that all match the colour of the outermost ring. Letterbox bars inside a frame of another colour are not
    frame."""
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


def seen(path: str) -> str:
    """A file as it is now, cheaply: its size and modification time, "size:mtime_ns" ("" where it cannot be
    stat'ed). A row records what its image was (harness/pipeline/resume.py): a file replaced since is redone."""
    try:
        status = os.stat(path)
    except OSError:
        return ""
    return f"{status.st_size}:{status.st_mtime_ns}"


def decode_sample(path: str, decoding: Decoding, transform: Callable[[Image.Image], T]) -> tuple[T | None, str, str]:
    """One file through decode, frame strip and `transform`, within the limits: the work of every decoder (the
    DataLoader's workers and the head start's), so both give the same pixels and the same reasons. Returns the
    sample, "" and the file as it was read (`seen`), or None and why the file failed: one bad file must cost one
    row, never the run; a ModelFailure where the model's own transform raised, which stops the run. A file that
    changed while it was read failed: its pixels are of neither version."""
    before = seen(path)
    try:
        limits = decoding.limits
        with time_limit(limits.timeout):
            image = decode(path, decoding.options, decoding.draft_to, limits.max_pixels, decoding.pre.border)
            check_resized(image.size, decoding.pre, limits.max_pixels)
            sample = transform(image)
    except ModelFault as fault:
        return None, ModelFailure(str(fault)), before
    except Exception as error:
        return None, describe_user_error(error), before
    if seen(path) != before:
        return None, "the file changed while it was read", before
    return sample, "", before
