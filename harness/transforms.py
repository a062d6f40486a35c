"""Preprocessing, split where it is cheapest: geometry in the workers, values on the device.

Workers resize and crop on the CPU and hand over uint8 tensors (a quarter of float32's bytes through the worker
pipes and the host-to-device copy); the device turns them into the model's floats in one fused multiply-add.
"""

from __future__ import annotations

import numpy as np
import torch
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


def resize_shorter(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Scale so the shorter side is `size`, the longer side truncated as torchvision's Resize(int) does."""
    width, height = image.size
    new_size = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if new_size == image.size:
        return image
    return image.resize(new_size, RESAMPLING[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central size x size square, placed as torchvision's CenterCrop places it."""
    width, height = image.size
    left = round((width - size) / 2.0)
    top = round((height - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def geometry(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side, centre-crop, and return a 3 x S x S uint8 tensor in RGB order."""
    resized = resize_shorter(image, pre.resize_to, pre.interpolation)
    return to_uint8_chw(center_crop(resized, pre.input_size))


class DeviceNormalizer:
    """uint8 N x 3 x H x W on the device -> the model's input: channel order, scale, mean and std in one affine.

    (x / d - mean) / std == x * (1 / (d * std)) + (-mean / std), with d = 255 for values 0..1 and 1 for 0..255.
    """

    def __init__(self, pre: Preprocess, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        divisor = 255.0 if pre.value_scale == 1.0 else 1.0
        mean = pre.mean or (0.0, 0.0, 0.0)
        std = pre.std or (1.0, 1.0, 1.0)
        scale = [1.0 / (divisor * s) for s in std]
        shift = [-m / s for m, s in zip(mean, std, strict=True)]
        self.bgr = pre.channel_order == "bgr"  # mean and std are given in the model's channel order
        self.scale = torch.tensor(scale, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.shift = torch.tensor(shift, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:  # a model folder's own transform has already made the model's floats
            return batch.to(dtype=self.dtype, memory_format=self.memory_format)
        if self.bgr:
            batch = batch.flip(1)
        out = torch.addcmul(self.shift, batch.float(), self.scale)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)
