"""Argument types the tools share."""

from __future__ import annotations

import argparse
import math


def positive_number(text: str) -> float:
    """A limit or tolerance: a finite number above 0 (one of nan or inf would let everything pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a finite number above 0")
    return value
