"""The two views of one sample: the student's full image and the teacher's evidence crop.

Vision-OPD trains one model under two inputs that share the question text: the student sees
the full image (optionally with the evidence box drawn in red), the teacher sees a zoomed crop
around the evidence. Crops are always cut from the clean image, never from a copy with a box
drawn on it, so no red pixels leak into the teacher's view.

Knobs live in :class:`vopd.config.ViewConfig`; ``docs/config.md`` lists them
with defaults and allowed values, ``docs/data.md`` with pitfalls.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from vopd.config import ViewConfig
from vopd.images import load_image, to_rgb
from vopd.records import Box, RecordError, Sample

__all__ = [
    "HINT",
    "INSTRUCTION",
    "REFERENCE_TEMPLATE",
    "evidence_region",
    "make_views",
    "missing_evidence",
    "prompt_text",
    "reference_text",
    "replay_draw",
    "student_view",
    "teacher_view",
    "zoomed_size",
]

#: The sentence Vision-OPD-6K adds to every training question (the student sees a red box).
HINT = "Only focus on the objects inside the red bounding box in the image to answer this question."
#: The closing instruction of every multiple-choice question.
INSTRUCTION = "Answer with the option's letter from the given choices."


def _fit_span(lo: float, hi: float, min_side: int, limit: int) -> tuple[int, int]:
    """Grow ``[lo, hi]`` to ``min_side`` around its centre, then shift it inside ``[0, limit]``."""
    side = max(hi - lo, min(min_side, limit))
    if side >= limit:
        return 0, limit
    centre = (lo + hi) / 2
    lo, hi = centre - side / 2, centre + side / 2
    if lo < 0:  # shift rather than cut, so the crop keeps its size near borders
        lo, hi = 0.0, hi - lo
    elif hi > limit:
        lo, hi = lo - (hi - limit), float(limit)
    # Outward rounding keeps every evidence pixel; the clamp undoes float noise.
    lo_i, hi_i = max(0, math.floor(lo)), min(limit, math.ceil(hi))
    return lo_i, max(hi_i, lo_i + 1)


def evidence_region(boxes: Sequence[Box], image_size: tuple[int, int], cfg: ViewConfig) -> Box:
    """The crop rectangle for the teacher, in integer pixel coordinates inside the image.

    The union of ``boxes`` (clipped to the image), padded by ``cfg.context`` of its own size
    on each side, grown to ``cfg.min_side`` around its centre, and shifted (not cut) to lie
    inside the image; only a region larger than the image is clamped to it.

    Raises:
        ValueError: no boxes, or boxes entirely outside the image.
    """
    if not boxes:
        raise ValueError("evidence_region needs at least one box")
    width, height = image_size
    union = Box.union(boxes).clip(image_size)
    if union.width <= 0 or union.height <= 0:
        raise ValueError(f"evidence boxes {[b.as_list() for b in boxes]} lie outside the {width}x{height} image")
    pad_x, pad_y = cfg.context * union.width, cfg.context * union.height
    x1, x2 = _fit_span(union.x1 - pad_x, union.x2 + pad_x, cfg.min_side, width)
    y1, y2 = _fit_span(union.y1 - pad_y, union.y2 + pad_y, cfg.min_side, height)
    return Box(x1, y1, x2, y2)


def zoomed_size(size: tuple[int, int], cfg: ViewConfig) -> tuple[int, int]:
    """Output size of a ``size`` crop zoomed by ``cfg.zoom`` within ``cfg.max_pixels``."""
    width, height = size
    if width * height * cfg.zoom**2 <= cfg.max_pixels:
        return max(1, round(width * cfg.zoom)), max(1, round(height * cfg.zoom))
    zoom = math.sqrt(cfg.max_pixels / (width * height))
    # Floor keeps the product within the budget.
    return max(1, math.floor(width * zoom)), max(1, math.floor(height * zoom))


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.copy() if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def teacher_view(image: Image.Image, boxes: Sequence[Box], cfg: ViewConfig) -> Image.Image:
    """Crop the evidence region from the clean ``image`` and zoom it (bicubic, pixel budget)."""
    region = evidence_region(boxes, image.size, cfg)
    crop = image.crop((int(region.x1), int(region.y1), int(region.x2), int(region.y2)))
    return _resize(crop, zoomed_size(crop.size, cfg))


def _line_width(image_size: tuple[int, int], cfg: ViewConfig) -> int:
    return cfg.box_width or max(2, round(min(image_size) / 250))


def student_view(image: Image.Image, boxes: Sequence[Box], cfg: ViewConfig) -> Image.Image:
    """The full image; with ``cfg.draw_box`` a copy with each box outlined outside its pixels.

    The input is never modified.
    """
    out = to_rgb(image)
    if not cfg.draw_box or not boxes:
        return out
    draw = ImageDraw.Draw(out)
    line = _line_width(out.size, cfg)
    for box in boxes:
        b = box.clip(out.size)
        if b.width <= 0 or b.height <= 0:
            continue
        # Pixels covered by the box are floor(x1)..ceil(x2)-1; PIL rectangles are inclusive and
        # draw their outline inwards, so expand by margin + line to keep the box itself clean.
        grow = cfg.box_margin + line
        draw.rectangle(
            (math.floor(b.x1) - grow, math.floor(b.y1) - grow, math.ceil(b.x2) - 1 + grow, math.ceil(b.y2) - 1 + grow),
            outline=cfg.box_color,
            width=line,
        )
    return out


def prompt_text(sample: Sample, *, hint: bool) -> str:
    """The question text both views share; blocks are separated by a blank line.

    Layout (the order of the Vision-OPD-6K ``problem`` text)::

        <question>

        <HINT>                      (only if hint)

        A. <option 1>
        B. <option 2>               (only if sample.options)

        <INSTRUCTION>               (only if sample.options)
    """
    blocks = [sample.question.strip()]
    if hint:
        blocks.append(HINT)
    if sample.options:
        blocks.append("\n".join(f"{chr(ord('A') + i)}. {opt.strip()}" for i, opt in enumerate(sample.options)))
        blocks.append(INSTRUCTION)
    return "\n\n".join(blocks)


#: How OPSD's teacher (``objective=opsd``) is told the reference answer: appended to the shared
#: prompt text as its own block, so the teacher's prompt is the student's plus this line.
REFERENCE_TEMPLATE = "Reference answer: {answer}"


def reference_text(sample: Sample, *, hint: bool) -> str:
    """The privileged teacher text of OPSD: :func:`prompt_text` plus a last block
    :data:`REFERENCE_TEMPLATE` holding ``sample.answer``.

    Raises:
        RecordError: the sample has no reference answer (field ``answer``).
    """
    if sample.answer is None or not str(sample.answer).strip():
        raise RecordError(
            f"sample {sample.id!r} has no reference answer; objective=opsd puts the answer in the "
            "teacher's text, so every training record needs one",
            field="answer",
        )
    return prompt_text(sample, hint=hint) + "\n\n" + REFERENCE_TEMPLATE.format(answer=str(sample.answer).strip())


def _provided_crop(sample: Sample, cfg: ViewConfig) -> Image.Image:
    crop = load_image(sample.teacher_image, where=f"sample {sample.id!r}, teacher_image")
    if crop.width * crop.height <= cfg.max_pixels:
        return crop
    ratio = math.sqrt(cfg.max_pixels / (crop.width * crop.height))
    return _resize(crop, (max(1, math.floor(crop.width * ratio)), max(1, math.floor(crop.height * ratio))))


def replay_draw(sample_id: str) -> float:
    """A number in [0, 1) fixed by the sample id alone (SHA-256), for ``ViewConfig.student_crop_share``.

    A hash, not a random stream: the same samples replay the crop whatever the order, batch size,
    number of workers or resume point.
    """
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2.0**64


def missing_evidence(sample: Sample, cfg: ViewConfig) -> str | None:
    """Why the teacher view of ``sample`` cannot be built (no boxes and no usable crop), or None.

    The one rule `make_views` applies and ``vopd data check`` reports (``"boxes": []`` or ``null``
    with no ``teacher_image``), so the check rejects exactly what training rejects.
    """
    if sample.boxes or (cfg.use_provided_crop and sample.teacher_image is not None):
        return None
    return (
        f"sample {sample.id!r} has no evidence boxes"
        + (" (teacher_image ignored: use_provided_crop=False)" if sample.teacher_image else "")
        + "; the teacher view needs boxes or a teacher_image"
    )


def make_views(sample: Sample, cfg: ViewConfig) -> tuple[Image.Image, Image.Image, str]:
    """Return ``(student image, teacher image, prompt text)`` for one sample.

    The teacher image is ``sample.teacher_image`` (if present and ``cfg.use_provided_crop``,
    downscaled to ``cfg.max_pixels`` if larger) or a crop of the clean image around the boxes.

    Raises:
        RecordError: the sample has neither boxes nor a usable teacher image, or its boxes lie
            outside the image (field ``boxes``).
        vopd.images.ImageError: an image cannot be loaded.
    """
    image = load_image(sample.image, where=f"sample {sample.id!r}")
    student = student_view(image, sample.boxes, cfg)
    if cfg.use_provided_crop and sample.teacher_image is not None:
        teacher = _provided_crop(sample, cfg)
    elif sample.boxes:
        try:
            teacher = teacher_view(image, sample.boxes, cfg)
        except ValueError as err:
            raise RecordError(f"sample {sample.id!r}: {err}", field="boxes") from None
    else:
        raise RecordError(missing_evidence(sample, cfg) or "", field="boxes")
    return student, teacher, prompt_text(sample, hint=cfg.hint)
