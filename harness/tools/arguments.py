"""What the tools' command lines share: argument types, and the photos `harness check` ships with."""

from __future__ import annotations

import argparse
import math

PHOTOS = "photos"  # in harness/data
PHOTO_ANSWERS = "labels.json"  # beside the photos: file name -> the ImageNet ids that count as right


def positive_number(text: str) -> float:
    """A limit or tolerance: a finite number above 0 (one of nan or inf would let everything pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a finite number above 0")
    return value
