"""Value parsers: each takes a YAML value or a string and returns the typed value, or raises ValueError saying
what it expected. harness/config.py gives each setting one, so a value is read the same from every source."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_TIMEOUT_S = 7 * 24 * 3600.0  # the longest timeout the interval timer takes everywhere; none means no limit

Parse = Callable[[Any], Any]


@dataclass(frozen=True)
class Parser:
    """A setting's parser with the metavar its command-line option shows, so --help follows the parsers."""

    metavar: str
    parse: Parse

    def __call__(self, value: Any) -> Any:
        return self.parse(value)


def metavar(parse: Parse) -> str:
    return parse.metavar if isinstance(parse, Parser) else "VALUE"


def integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        number = int(value) if isinstance(value, int) else int(str(value).strip())
        if number < minimum:
            raise ValueError(f"must be >= {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"must be <= {maximum:,}")
        return number

    return Parser("N", parse)


def finite(value: Any) -> float:
    """A number that is a number: NaN and the infinities would pass every range check and poison every result."""
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def number(low: float, high: float | None = None) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        number = finite(value)
        if number < low or (high is not None and number > high):
            raise ValueError(f"must be in [{low}, {high}]" if high is not None else f"must be >= {low}")
        return number

    return Parser("X", parse)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


switch = Parser("true|false", parse_bool)


def parse_bool_or_auto(value: Any) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_bool(value)


bool_or_auto = Parser("true|false|auto", parse_bool_or_auto)


def choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip()
        if text.lower() in choices:
            return text.lower()
        raise ValueError(f"expected one of {', '.join(choices)}")

    return Parser("|".join(choices), parse)


def parse_text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


text = Parser("TEXT", parse_text)


def parse_folder_or_word(value: Any) -> str:
    """A folder, or auto or none (any case)."""
    text = parse_text(value)
    return text.lower() if text.lower() in ("auto", "none") else text


folder_auto_none = Parser("PATH|auto|none", parse_folder_or_word)
label_map_name = Parser("MAP", parse_text)
path = Parser("PATH", lambda value: Path(parse_text(value)))


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return parse(value)

    return Parser(metavar(parse), parse_optional)


optional_bool = optional(switch)  # a switch that can also be left unset (none)


def parse_triple(value: Any) -> tuple[float, float, float] | None:
    """Per-channel mean or std: three numbers, one number for all channels, or none to skip normalisation."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    numbers = [finite(item) for item in items]
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3:
        raise ValueError("expected one or three numbers")
    return (numbers[0], numbers[1], numbers[2])


triple = Parser("V[,V,V]", parse_triple)


def parse_border(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return integer(0)(value)
    except ValueError:
        raise ValueError("expected a number of pixels (>= 0) or auto") from None


border = Parser("N|auto", parse_border)


def parse_alpha(value: Any) -> str:
    """drop, or the colour transparent pixels are composited onto: white, black or #RRGGBB."""
    text = str(value).strip().lower()
    if text in ("drop", "white", "black") or re.fullmatch(r"#[0-9a-f]{6}", text):
        return text
    raise ValueError("expected drop, white, black or #RRGGBB")


alpha = Parser("drop|white|black|#RRGGBB", parse_alpha)


def parse_value_scale(value: Any) -> float:
    number = finite(value)
    if number not in (1.0, 255.0):
        raise ValueError("expected 1 (values 0..1) or 255 (values 0..255)")
    return number


value_scale = Parser("1|255", parse_value_scale)


def parse_amp(value: Any) -> str | None:
    parsed = choice("off", "none", "bf16", "fp16", "bfloat16", "float16")(value if value is not None else "off")
    return {"off": None, "none": None, "bfloat16": "bf16", "float16": "fp16"}.get(parsed, parsed)


amp = Parser("off|bf16|fp16", parse_amp)


def parse_max_failures(value: Any) -> float | None:
    """A count (>= 1, or 0 for none allowed) or a fraction of the images (0 < f < 1)."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    number = finite(value)
    if number < 0 or (number >= 1 and number != int(number)):
        raise ValueError("expected a count (0, 1, 2, ...) or a fraction between 0 and 1")
    return number


max_failures = Parser("N|FRACTION", parse_max_failures)


def parse_timeout(value: Any) -> float | None:
    """Seconds > 0, or none to wait as long as it takes."""
    if value is None or str(value).strip().lower() in ("", "none", "null", "off"):
        return None
    number = finite(value)
    if not 0 < number <= MAX_TIMEOUT_S:
        raise ValueError(f"expected seconds > 0 and at most {MAX_TIMEOUT_S:g}, or none to switch the timeout off")
    return number


timeout = Parser("SECONDS|none", parse_timeout)
