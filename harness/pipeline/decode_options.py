"""How a file's pixels become RGB: the decode settings, apart from the decoders (decode.py, png.py) that both
follow them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import ImageColor

if TYPE_CHECKING:
    from harness.config import Preprocess


@dataclass(frozen=True)
class DecodeOptions:
    """How a file's pixels become RGB (the preprocessing settings alpha, exif_transpose and sixteen_bit). The
    defaults give `Image.open(path).convert("RGB")`, pixel for pixel: what torchvision's ImageFolder, timm's datasets,
    the ObjectNet template and Hugging Face's training scripts feed a model, so the harness predicts what the
    model's own pipeline would. The others show an image as a viewer does, for models trained that way."""

    alpha: str = "drop"  # drop, or the colour transparent pixels are composited onto (white, black, #rrggbb)
    exif_transpose: bool = False
    sixteen_bit: str = "clip"  # clip (Pillow's convert) or scale (16-bit grey by its high byte)

    @classmethod
    def of(cls, pre: Preprocess) -> DecodeOptions:
        return cls(pre.alpha, pre.exif_transpose, pre.sixteen_bit)

    @property
    def background(self) -> tuple[int, int, int] | None:
        """The colour to composite onto, or None where the alpha channel is dropped."""
        return None if self.alpha == "drop" else ImageColor.getrgb(self.alpha)[:3]


DEFAULT_OPTIONS = DecodeOptions()
