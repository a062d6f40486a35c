"""What `harness check` shows: preview.png (a contact sheet) and preview.html (self-contained, images inlined), each
with the check's verdicts and, for every image, the original, the crop the model receives, and its top-5 labels
by name with probabilities, the true ones marked.

The crop tile is the model's input tensor itself (3 x S x S, after every preprocessing step), read back the way
the harness's default preprocessing would have written it: RGB, values 0..1, ImageNet's mean and std. Channel c
of the tensor is drawn as red, green, blue for c = 0, 1, 2, each pixel

    round(clip(255 * (input[c, y, x] * IMAGENET_STD[c] + IMAGENET_MEAN[c]), 0, 255))

A fixed reading, not the configured one: undoing the configured steps would give the photo back whatever they
are, and no mistake could show. Read this way, a model that takes the default preprocessing sees its photo
exactly; one normalised otherwise sees it with other contrast (EfficientNet-Lite0's (x - 127) / 128 about half);
swapped channels turn skin and a cat's fur blue; a value scale off by 255 gives a flat dark tile, and missing
normalisation a white one.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from harness.config import IMAGENET_MEAN, IMAGENET_STD
from harness.results.writer import write_atomic_bytes, write_atomic_text

PAD = 12
FONT_SIZE = 13
LINE = 17  # pixels per text line
TEXT_WIDTH = 420  # the column of labels beside the pictures
ORIGINAL_BOX = 160  # the square an original is fitted into
VERDICT_AT, DETAIL_AT = 110, 160  # the verdict table's columns, in pixels from the left
BACKGROUND, INK, TRUE_INK, FAIL_INK, FAINT_INK = "white", (20, 20, 20), (0, 120, 0), (180, 0, 0), (110, 110, 110)


def standard_view(model_input: torch.Tensor) -> np.ndarray:
    """A model input (C x H x W) as an H x W x 3 uint8 picture, by the module docstring's fixed reading (a one-channel
    input is read as three copies of its channel)."""
    values = model_input.detach().float().cpu().numpy().astype(np.float64)
    if values.shape[0] != 3:
        values = np.repeat(values[:1], 3, axis=0)
    std = np.array(IMAGENET_STD).reshape(3, 1, 1)
    mean = np.array(IMAGENET_MEAN).reshape(3, 1, 1)
    pixels = np.rint(np.clip(255.0 * (values * std + mean), 0, 255)).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0))


@dataclass(frozen=True)
class Label:
    text: str  # id and name
    confidence: float
    true: bool


@dataclass
class Item:
    """One image's row: what it was, what the model received, what it said."""

    key: str
    original: Image.Image | None  # None when it could not be read
    tile: np.ndarray | None  # H x W x 3 uint8, from standard_view
    labels: list[Label]
    truth: str  # the true label, as shown; "" when there is no answer
    note: str  # why it failed, or the range of the input's values


@dataclass
class Preview:
    title: str
    lines: list[str]  # under the title: model, preprocessing, how to read the tiles
    verdicts: list[tuple[str, str, str]]  # check, verdict, detail
    tables: list[tuple[str, list[list[str]]]] = field(default_factory=list)  # (caption, header row + rows)
    items: list[Item] = field(default_factory=list)


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


Ink = tuple[int, int, int]
Line = tuple[list[tuple[int, str]], Ink]  # (x offset, text) pieces of one line, and their colour


def _wrapped(text: str, pixels: int) -> list[str]:
    """`text` in lines no wider than `pixels` in the sheet's font, broken between words."""
    font, lines, line = _font(), [], ""
    for word in text.split(" "):
        longer = f"{line} {word}" if line else word
        if line and font.getlength(longer) > pixels:
            lines.append(line)
            line = word
        else:
            line = longer
    return [*lines, line]


def _item_lines(item: Item) -> list[Line]:
    lines: list[Line] = [([(0, item.key)], INK)]
    if item.truth:
        lines += [([(0, text)], TRUE_INK) for text in _wrapped(f"true: {item.truth}", TEXT_WIDTH)]
    for label in item.labels:
        mark = "  <- true" if label.true else ""
        lines.append(([(0, f"{label.confidence:8.4f}  {label.text}{mark}")], TRUE_INK if label.true else INK))
    return lines + [([(0, text)], FAINT_INK) for text in _wrapped(item.note, TEXT_WIDTH)]


def _header_lines(preview: Preview, width: int) -> list[Line]:
    lines: list[Line] = [([(0, preview.title)], INK)]
    lines += [([(0, text)], FAINT_INK) for line in preview.lines for text in _wrapped(line, width)]
    for check, verdict, detail in preview.verdicts:
        ink = FAIL_INK if verdict == "FAIL" else INK
        for n, text in enumerate(_wrapped(detail, width - DETAIL_AT)):
            lines.append(
                ([(0, check), (VERDICT_AT, verdict), (DETAIL_AT, text)] if n == 0 else [(DETAIL_AT, text)], ink)
            )
    font = _font()
    for caption, rows in preview.tables:
        lefts = [0]
        for column in range(len(rows[0]) - 1):
            lefts.append(lefts[-1] + int(max(font.getlength(row[column]) for row in rows)) + 2 * PAD)
        lines.append(([(0, caption)], FAINT_INK))
        lines += [(list(zip(lefts, row, strict=True)), FAIL_INK if "YES" in row else INK) for row in rows]
    return lines


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on the contact sheet: a header, then a row per image of the original (fitted into an
    ORIGINAL_BOX square), the model's input at its own size, and the labels."""

    side: int  # the model input's side
    header_lines: int
    item_lines: int  # the most text lines of any image

    @property
    def row_height(self) -> int:
        return max(ORIGINAL_BOX, self.side, self.item_lines * LINE) + PAD

    @property
    def top(self) -> int:
        return PAD + self.header_lines * LINE + PAD

    @property
    def width(self) -> int:
        return sheet_width(self.side)

    def height(self, rows: int) -> int:
        return self.top + rows * self.row_height

    def original_box(self, row: int) -> tuple[int, int]:
        return PAD, self.top + row * self.row_height

    def tile_box(self, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of row `row`'s model input."""
        left, top = PAD + ORIGINAL_BOX + PAD, self.top + row * self.row_height
        return left, top, left + self.side, top + self.side

    def text_origin(self, row: int) -> tuple[int, int]:
        return PAD + ORIGINAL_BOX + PAD + self.side + PAD, self.top + row * self.row_height


def sheet_width(side: int) -> int:
    return PAD + ORIGINAL_BOX + PAD + side + PAD + TEXT_WIDTH + PAD


def layout_of(preview: Preview) -> SheetLayout:
    side = max((max(item.tile.shape[:2]) for item in preview.items if item.tile is not None), default=ORIGINAL_BOX)
    return SheetLayout(
        side=side,
        header_lines=len(_header_lines(preview, sheet_width(side) - 2 * PAD)),
        item_lines=max((len(_item_lines(item)) for item in preview.items), default=1),
    )


def _draw_lines(draw: ImageDraw.ImageDraw, origin: tuple[int, int], lines: list[Line]) -> None:
    font = _font()
    for n, (pieces, ink) in enumerate(lines):
        for offset, text in pieces:
            draw.text((origin[0] + offset, origin[1] + n * LINE), text, fill=ink, font=font)


def contact_sheet(preview: Preview) -> Image.Image:
    layout = layout_of(preview)
    sheet = Image.new("RGB", (layout.width, layout.height(len(preview.items))), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _draw_lines(draw, (PAD, PAD), _header_lines(preview, layout.width - 2 * PAD))
    for row, item in enumerate(preview.items):
        left, top = layout.original_box(row)
        if item.original is not None:
            sheet.paste(thumbnail(item.original), (left, top))
        else:
            draw.rectangle((left, top, left + ORIGINAL_BOX - 1, top + ORIGINAL_BOX - 1), outline=FAIL_INK)
            _draw_lines(draw, (left + 6, top + 6), [([(0, "could not be read")], FAIL_INK)])
        if item.tile is not None:
            sheet.paste(Image.fromarray(item.tile, "RGB"), layout.tile_box(row)[:2])
        _draw_lines(draw, layout.text_origin(row), _item_lines(item))
    return sheet


def thumbnail(image: Image.Image) -> Image.Image:
    small = image.copy()
    small.thumbnail((ORIGINAL_BOX, ORIGINAL_BOX))
    return small


def _png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: Image.Image, alt: str, css: str = "") -> str:
    return (
        f'<img src="{_png_uri(image)}" width="{image.width}" height="{image.height}" alt="{html.escape(alt)}"'
        f"{f' class={css}' if css else ''}>"
    )


def _table(rows: list[list[str]], css: str = "") -> str:
    head, *body = rows
    cells = "".join(f"<th>{html.escape(cell)}</th>" for cell in head)
    lines = [f'<table class="{css}"><tr>{cells}</tr>']
    for row in body:
        state = f' class="{row[1].lower()}"' if len(row) > 1 and row[1] in ("FAIL", "warn") else ""
        lines.append(f"<tr{state}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    return "\n".join([*lines, "</table>"])


STYLE = """
body { font: 14px/1.4 sans-serif; margin: 16px; color: #141414; background: #fff; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { text-align: left; padding: 2px 10px 2px 0; vertical-align: top; }
tr.fail td { color: #b40000; } tr.warn td { color: #8a5a00; }
section { display: flex; gap: 12px; align-items: flex-start; margin: 12px 0; }
section > figure:first-child { width: 160px; }
figure { margin: 0; } figcaption { color: #6e6e6e; font-size: 12px; }
img.tile { image-rendering: pixelated; }
ol { margin: 0; padding-left: 20px; font-family: monospace; } li.true { color: #007800; font-weight: bold; }
.note { color: #6e6e6e; }
"""


def page(preview: Preview) -> str:
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(preview.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(preview.title)}</h1>",
        *(f"<p class=note>{html.escape(text)}</p>" for text in preview.lines),
        _table([["check", "verdict", "detail"], *[list(row) for row in preview.verdicts]], "verdicts"),
    ]
    for caption, rows in preview.tables:
        parts += [f"<h2>{html.escape(caption)}</h2>", _table(rows)]
    for item in preview.items:
        original = _img(thumbnail(item.original), "original") if item.original is not None else "<p>unreadable</p>"
        tile = _img(Image.fromarray(item.tile, "RGB"), "model input", "tile") if item.tile is not None else ""
        labels = "".join(
            f"<li{' class=true' if label.true else ''}>{label.confidence:.4f} {html.escape(label.text)}"
            f"{' (true)' if label.true else ''}</li>"
            for label in item.labels
        )
        truth = f"<p>true: {html.escape(item.truth)}</p>" if item.truth else ""
        parts.append(
            f"<section><figure>{original}<figcaption>original</figcaption></figure>"
            f"<figure>{tile}<figcaption>what the model receives</figcaption></figure>"
            f"<div><h3>{html.escape(item.key)}</h3>{truth}<ol>{labels}</ol>"
            f"<p class=note>{html.escape(item.note)}</p></div></section>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_preview(preview: Preview, png: Path, page_path: Path) -> None:
    """The contact sheet and the page, each written whole or not at all."""
    buffer = io.BytesIO()
    contact_sheet(preview).save(buffer, "PNG", optimize=True)
    write_atomic_bytes(png, buffer.getvalue())
    write_atomic_text(page_path, page(preview))
