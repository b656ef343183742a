"""A picture to look at: a grid of the built questions' crops, each with its question, options and answer."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["GalleryItem", "write_gallery"]

CELL = 240  # crop side in the grid
TEXT_H = 150  # text area under each crop
COLUMNS = 4


class GalleryItem:
    """One cell: the crop and the lines to print under it."""

    def __init__(self, crop: Image.Image, question: str, options: Sequence[str], answer: str):
        self.crop = crop
        self.question = question
        self.options = list(options)
        self.answer = answer

    def lines(self, width_chars: int) -> list[str]:
        out = textwrap.wrap(self.question, width_chars)[:4]
        for i, opt in enumerate(self.options):
            letter = "ABCD"[i]
            mark = "*" if letter == self.answer else " "
            out.append(textwrap.shorten(f"{mark}{letter}. {opt}", width_chars, placeholder="..."))
        return out


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def write_gallery(items: Sequence[GalleryItem], path: str | Path) -> Path | None:
    """Draw ``items`` in a grid (``*`` marks the answer) and save it as PNG; None when there is nothing to draw."""
    if not items:
        return None
    cols = min(COLUMNS, len(items))
    rows = (len(items) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * CELL, rows * (CELL + TEXT_H)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for k, item in enumerate(items):
        x, y = (k % cols) * CELL, (k // cols) * (CELL + TEXT_H)
        crop = ImageOps.contain(item.crop, (CELL - 8, CELL - 8))  # small crops are enlarged to be seen
        sheet.paste(crop, (x + (CELL - crop.width) // 2, y + (CELL - crop.height) // 2))
        for j, line in enumerate(item.lines(38)):
            draw.text((x + 4, y + CELL + 2 + 14 * j), line, fill=(0, 0, 0), font=font)
        draw.rectangle((x, y, x + CELL - 1, y + CELL + TEXT_H - 1), outline=(200, 200, 200))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path
