"""How a run decodes: the settings every decoder follows (decode.py and png.py read a file as they say), decided
once per run and handed, frozen and torch-free, to the head start's decoders and the DataLoader's workers alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import ImageColor

if TYPE_CHECKING:
    from harness.config import Config, Preprocess


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


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int | None = None
    timeout: float | None = None

    @classmethod
    def of(cls, config: Config) -> DecodeLimits:
        """The run's limits, so every path that decodes (run, head start, benchmark, export parity) refuses the
        same files."""
        return cls(config.max_pixels, config.decode_timeout)


@dataclass(frozen=True)
class Decoding:
    """Everything a decoder needs to turn one file into the model's pixels: the frame (`pre.border`), how pixels
    become RGB (`options`), the JPEG draft size, the limits, and the model folder's own transform where it cuts the
    image instead of the harness's geometry (its code needs torch, so only the DataLoader's workers run it:
    harness/pipeline/loader.py). Built once, so the head start and the workers cannot work any of it out twice."""

    pre: Preprocess
    limits: DecodeLimits = DecodeLimits()
    transform_file: Path | None = None
    options: DecodeOptions = field(init=False)
    draft_to: int | None = field(init=False)  # decode JPEGs at 1/2..1/8 scale down to this; None: at full size

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", DecodeOptions.of(self.pre))
        # drafting needs the size the image is cut to, which a model folder's own transform hides
        drafted = self.pre.jpeg_draft and self.transform_file is None
        object.__setattr__(self, "draft_to", self.pre.resize_to if drafted else None)

    @classmethod
    def of(cls, config: Config) -> Decoding:
        """The run's decoding: its preprocessing, its limits, and the model folder's transform where there is one."""
        own = config.transform_file
        return cls(config.preprocess, DecodeLimits.of(config), own if own.is_file() else None)
