"""Preprocessing, split where it is cheapest: geometry in the workers (here), values on the device.

Workers resize and crop on the CPU and hand over uint8 arrays (a quarter of float32's bytes through the worker
pipes and the host-to-device copy); `devices.DeviceNormalizer` turns them into the model's floats in one fused
multiply-add. Torch-free, so the head start's decoders can run it before torch is imported.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from harness.config import Preprocess

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def shorter_side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    """An image's size once its shorter side is `side`, the longer truncated as torchvision's Resize(int) does."""
    width, height = size
    return (side, int(side * height / width)) if width <= height else (int(side * width / height), side)


def resize_shorter(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Scale so the shorter side is `size`, the longer side truncated as torchvision's Resize(int) does."""
    new_size = shorter_side_to(image.size, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, RESAMPLING[interpolation])


def center_crop(image: Image.Image, size: int, offset: str = "round") -> Image.Image:
    """The central size x size square, placed as torchvision's CenterCrop places it (round), or as Hugging Face's
    image processors do (floor): the two differ by a pixel where the margin is odd."""
    width, height = image.size
    if offset == "floor":
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = round((width - size) / 2.0), round((height - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def to_uint8_chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def resize_square(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Both sides to `size`, the aspect ratio not kept (timm's `squash`, a Hugging Face processor's height x width)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), RESAMPLING[interpolation])


def geometry(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize (the shorter side, or both sides with resize_mode squash), centre-crop, and return a 3 x S x S uint8
    array in RGB order."""
    resize = resize_square if pre.resize_mode == "squash" else resize_shorter
    resized = resize(image, pre.resize_to, pre.interpolation)
    return to_uint8_chw(center_crop(resized, pre.input_size, pre.crop_offset))
