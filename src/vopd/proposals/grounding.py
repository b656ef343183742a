"""Evidence boxes the model names itself when asked (``views.crop_source=grounding``).

Qwen-VL models were trained to answer with a bounding box when asked to locate something. Here
the question goes inside a grounding instruction ("Locate the region of the image needed to
answer this question: ..."), the model answers greedily, and the first well-formed box in the
answer is mapped back to the image's pixels. Each family writes boxes its own way and in its own
coordinate frame; :data:`GROUNDING_FORMATS` is the one table that decides the prompt and the
frame (docs/proposals.md cites where each fact is documented):

- Qwen2-VL: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, coordinates normalised to 0-1000 of
  the image's width and height (Qwen2-VL paper, arXiv 2409.12191; QwenLM/Qwen3-VL#866).
- Qwen2.5-VL: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in absolute pixels of the
  image *as the processor resized it* (QwenLM/Qwen3-VL#676, #866). That size is
  ``image_grid_thw`` x ``patch_size``; the box is scaled from it back to the original image.
- Qwen3-VL: JSON ``bbox_2d`` again, but relative 0-1000 like Qwen2-VL (QwenLM/Qwen3-VL#1741
  quotes the Qwen3-VL README; #1427 and #1486, maintainers).

The parser accepts either syntax in any family (the coordinate frame is the family's): models
drift between them. It takes the first box in the text, swaps corners written in the wrong order
and clamps a box that sticks out of the image (``repaired``). An answer with no box
(``unparsed``) or a box of zero width or height inside the image (``degenerate``) falls back
to the whole image, i.e. no zoom: counted, reported, never silent.

The proposal's score is the mean log-probability of the tokens that spell the box (of the whole
answer when there is no box). This module makes no proposals cache and no crop; see
:mod:`vopd.proposals`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vopd.config import RolloutConfig
from vopd.images import load_image
from vopd.knobs import ConfigError
from vopd.models import build_prompts
from vopd.records import Box, Sample

__all__ = [
    "GroundingFormat",
    "GROUNDING_FORMATS",
    "RELATIVE_1000",
    "INPUT_PIXELS",
    "STATUSES",
    "FALLBACK_STATUSES",
    "BoxText",
    "Grounding",
    "grounding_format",
    "grounding_prompt",
    "find_box",
    "to_image_box",
    "read_answer",
    "model_input_size",
    "ground",
    "status_counts",
]

#: Coordinate frames: fractions of the image in thousandths, or pixels of the resized model input.
RELATIVE_1000 = "relative_1000"
INPUT_PIXELS = "input_pixels"

#: Outcome of parsing one answer: a box as written, a box fixed up (swapped corners or clamped to
#: the image), a box of no area, or no box at all. The last two fall back to the whole image.
STATUSES = ("ok", "repaired", "degenerate", "unparsed")
FALLBACK_STATUSES = ("degenerate", "unparsed")


@dataclass(frozen=True)
class GroundingFormat:
    """How one model family is asked for a box and how its answer's numbers are read.

    Attributes:
        prompt: the instruction, with ``{question}`` where the sample's question goes.
        frame: :data:`RELATIVE_1000` or :data:`INPUT_PIXELS`.
    """

    prompt: str
    frame: str


_REGION = "the region of the image needed to answer this question: {question}"
# Qwen2-VL marks the referred object with its ref tokens and answers with box tokens.
_QWEN2_PROMPT = "Locate <|object_ref_start|>" + _REGION + "<|object_ref_end|> and output its bounding box."
# The Qwen2.5-VL / Qwen3-VL cookbooks' wording ("Locate ..., output its bbox coordinates using JSON format").
_JSON_PROMPT = (
    "Locate " + _REGION + "\nOutput its bbox coordinates using JSON format, "
    'like {{"bbox_2d": [x1, y1, x2, y2], "label": "evidence"}}.'
)

#: model_type -> grounding format: the one place that decides prompt and parser per family.
GROUNDING_FORMATS: dict[str, GroundingFormat] = {
    "qwen2_vl": GroundingFormat(_QWEN2_PROMPT, RELATIVE_1000),
    "qwen2_5_vl": GroundingFormat(_JSON_PROMPT, INPUT_PIXELS),
    "qwen3_vl": GroundingFormat(_JSON_PROMPT, RELATIVE_1000),
    "qwen3_vl_moe": GroundingFormat(_JSON_PROMPT, RELATIVE_1000),
}


def grounding_format(model_or_type: Any) -> GroundingFormat:
    """The family's grounding format, from a model (its ``config.model_type``) or a model_type string.

    Raises:
        ConfigError: the family has no documented box format (names the key and the families that have one).
    """
    model_type = (
        model_or_type
        if isinstance(model_or_type, str)
        else getattr(getattr(model_or_type, "config", None), "model_type", None)
    )
    if model_type not in GROUNDING_FORMATS:
        raise ConfigError(
            f"views.crop_source=grounding needs a model family that answers with a box "
            f"({', '.join(GROUNDING_FORMATS)}); model_type {model_type!r} has no documented box format: "
            "use views.crop_source=search or attention"
        )
    return GROUNDING_FORMATS[model_type]


def grounding_prompt(fmt: GroundingFormat, sample: Sample) -> str:
    """The grounding instruction around the sample's question (its options, if any, appended)."""
    question = " ".join(sample.question.split())
    if sample.options:
        question += " Options: " + "; ".join(o.strip() for o in sample.options) + "."
    return fmt.prompt.format(question=question)


_NUM = r"[-+]?\d+(?:\.\d+)?"
# "(x1,y1),(x2,y2)" (Qwen2-VL, between its box tokens) and "[x1, y1, x2, y2]" (bbox_2d, JSON).
_PAIR = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_LIST = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


@dataclass(frozen=True)
class BoxText:
    """A box as the model wrote it: four numbers in its frame and their character span in the answer."""

    values: tuple[float, float, float, float]
    span: tuple[int, int]


def find_box(text: str) -> BoxText | None:
    """The first well-formed box in ``text`` in either syntax, or None (a malformed one is passed over)."""
    found = [m for m in (_PAIR.search(text), _LIST.search(text)) if m is not None]
    if not found:
        return None
    first = min(found, key=lambda m: m.start())
    values = tuple(float(v) for v in first.groups())
    if not all(math.isfinite(v) for v in values):
        return None
    return BoxText(values, first.span())  # type: ignore[arg-type]


def to_image_box(
    values: Sequence[float],
    fmt: GroundingFormat,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> tuple[Box | None, str]:
    """Map a box from the family's frame to pixels of the original image.

    Args:
        values: ``x1, y1, x2, y2`` as written.
        image_size: ``(width, height)`` of the original image.
        input_size: ``(width, height)`` of the image the model saw (after the processor's
            resize); needed for :data:`INPUT_PIXELS`.

    Returns:
        ``(box, status)``: status ``ok``, ``repaired`` (corners swapped or clamped to the image),
        or ``(None, "degenerate")`` for a box with no area inside the image.
    """
    width, height = image_size
    if fmt.frame == RELATIVE_1000:
        frame_w, frame_h = 1000, 1000
    elif fmt.frame == INPUT_PIXELS:
        if input_size is None:
            raise ValueError("a box in input pixels needs the model input's size")
        frame_w, frame_h = input_size
    else:  # pragma: no cover - the table holds only these two
        raise ValueError(f"unknown coordinate frame {fmt.frame!r}")
    # Multiply before dividing: 750 * 168 / 1000 is exactly 126, 750 * (168 / 1000) is not.
    x1, x2 = (v * width / frame_w for v in (values[0], values[2]))
    y1, y2 = (v * height / frame_h for v in (values[1], values[3]))
    status = "ok"
    if x1 > x2 or y1 > y2:
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        status = "repaired"
    clamped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if clamped != (x1, y1, x2, y2):
        status = "repaired"
    box = Box(*clamped)
    if box.width <= 0 or box.height <= 0:
        return None, "degenerate"
    return box, status


@dataclass(frozen=True)
class Grounding:
    """One answer read as a box: ``box`` in image pixels (the whole image on fallback), the score
    (mean log-prob of the box's tokens, of the whole answer without a box), the status and the text."""

    box: Box
    score: float
    status: str
    answer: str


def _token_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Character offset where each token's text ends in the decoded answer (prefix decodes)."""
    return [
        len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        for i in range(len(ids))
    ]


def _span_score(tokenizer: Any, ids: Sequence[int], logp: Sequence[float], span: tuple[int, int] | None) -> float:
    """Mean log-prob of the tokens overlapping the character ``span`` (all tokens when None)."""
    if not ids:
        return float("nan")
    picked = list(logp)
    if span is not None:
        ends = _token_ends(tokenizer, ids)
        starts = [0, *ends[:-1]]
        inside = [lp for s, e, lp in zip(starts, ends, logp) if s < span[1] and e > span[0]]
        picked = inside or picked
    return sum(picked) / len(picked)


def read_answer(
    tokenizer: Any,
    ids: Sequence[int],
    logp: Sequence[float],
    fmt: GroundingFormat,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> Grounding:
    """Read one greedy answer (token ids and their log-probs) as a :class:`Grounding`."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    found = find_box(text)
    whole = Box(0, 0, image_size[0], image_size[1])
    if found is None:
        return Grounding(whole, _span_score(tokenizer, ids, logp, None), "unparsed", text)
    box, status = to_image_box(found.values, fmt, image_size, input_size)
    score = _span_score(tokenizer, ids, logp, found.span)
    return Grounding(box if box is not None else whole, score, status, text)


def model_input_size(model: Any, batch: Any, row: int) -> tuple[int, int]:
    """(width, height) of the image as the model saw it: the patch grid times the patch size."""
    patch = getattr(getattr(model.config, "vision_config", None), "patch_size", None)
    if patch is None or "image_grid_thw" not in batch:
        raise ValueError(f"{type(model).__name__}: cannot tell the resized input size (no image_grid_thw / patch_size)")
    _, grid_h, grid_w = (int(v) for v in batch["image_grid_thw"][row])
    return grid_w * patch, grid_h * patch


def ground(
    model: Any,
    processor: Any,
    engine: Any,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    thinking: bool | None = None,
) -> list[Grounding]:
    """Ask the model for the evidence box of each sample (greedy, in batches) and read the answers.

    Args:
        engine: a rollout engine (``engine.sample(model, batch, cfg) -> Rollouts``), e.g.
            :class:`vopd.rollout.HFGenerateEngine`.
        max_new_tokens: answer budget; the first box is read, so a cut-off tail does not matter.
        thinking: the chat template's thinking switch (None: the template's default); a thinking
            model left thinking may spend the budget before the box (``unparsed``).

    Raises:
        ConfigError: the model's family has no grounding format.
    """
    fmt = grounding_format(model)
    greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    tokenizer = getattr(processor, "tokenizer", processor)
    out: list[Grounding] = []
    for start in range(0, len(samples), max(1, batch_size)):
        chunk = samples[start : start + max(1, batch_size)]
        images = [load_image(s.image, where=f"sample {s.id!r}") for s in chunk]
        batch = build_prompts(processor, images, [grounding_prompt(fmt, s) for s in chunk], thinking=thinking)
        rollouts = engine.sample(model, batch, greedy)
        for row, image in enumerate(images):
            keep = rollouts.mask_B_T[row].bool()
            ids = rollouts.response_ids_B_T[row][keep].tolist()
            logp = rollouts.sampler_logp_B_T[row][keep].float().tolist()
            size = model_input_size(model, batch, row) if fmt.frame == INPUT_PIXELS else None
            out.append(read_answer(tokenizer, ids, logp, fmt, image.size, size))
    return out


def status_counts(statuses: Sequence[str]) -> dict[str, Any]:
    """How the answers parsed: ``parsed`` (ok + repaired), ``repaired``, ``degenerate``, ``unparsed``
    and what a fallback is (``fallback_box``)."""
    counts = {s: sum(1 for x in statuses if x == s) for s in STATUSES}
    return {
        "parsed": counts["ok"] + counts["repaired"],
        "repaired": counts["repaired"],
        "degenerate": counts["degenerate"],
        "unparsed": counts["unparsed"],
        "fallback_box": "whole image",
    }
