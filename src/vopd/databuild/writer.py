"""Stage 2 of ``vopd data build``: the writer's prompt, and reading its question from the reply.

The writer sees the region's crop (the teacher's view) and, with ``--writer-full-image``, the
full image with the region's box drawn in red, and is asked for one four-option question as
JSON. The prompt is a template: ``{image}`` becomes the image's file name, ``{label}`` the
region's label (``unknown`` when there is none) and ``{views}`` a sentence saying which images
were shown. Only these three names are replaced; every other brace is kept as written, so a
template may show a JSON example as is.

A reply is accepted when, after an optional fenced code block is unwrapped, it holds one JSON
object with a non-empty ``question``, exactly four distinct non-empty ``options`` and an
``answer`` among them (a letter A-D, or the text of one option). Anything else is dropped and
counted by its reason (:data:`WRITER_DROPS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["DEFAULT_WRITER_PROMPT", "WRITER_DROPS", "WrittenQuestion", "parse_question", "render_prompt"]

#: The writer's default prompt (``--writer-prompt FILE`` replaces it; see the module doc for the placeholders).
DEFAULT_WRITER_PROMPT = """You write test questions about fine visual details.
{views}
The object in the region was labelled: {label}.

Write ONE multiple-choice question about a detail that can be read only by looking closely at this region \
(for example an object's colour, a material, a count, a word or number written on it, its state or a small part).
Rules:
- The question must be answerable from the region alone, and exactly one option must be right.
- Name the object so that it can be found in the full image (e.g. "the sign above the left door"); \
do not mention a crop, a box or a region.
- Give exactly 4 short, distinct, plausible options.
Reply with JSON only, in this form:
{"question": "...", "options": ["...", "...", "...", "..."], "answer": "A"}"""

VIEWS_CROP = "The image is a zoomed-in crop of a small region of a larger picture."
VIEWS_CROP_AND_FULL = (
    "The first image is a zoomed-in crop of a small region of a larger picture; "
    "the second image is the whole picture with that region outlined in red."
)

#: Why a writer's reply was not used (the summary counts each).
WRITER_DROPS = ("writer_failed", "writer_invalid_json", "writer_bad_fields", "writer_answer_not_in_options")

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Da-d])[\.\):]\s+")


@dataclass(frozen=True)
class WrittenQuestion:
    """A usable question: text, four options (without letters) and the answer letter."""

    question: str
    options: list[str]
    answer: str


def render_prompt(template: str, *, image: str, label: str | None, show_full: bool) -> str:
    """The writer's prompt for one region (only ``{image}``, ``{label}`` and ``{views}`` are replaced)."""
    views = VIEWS_CROP_AND_FULL if show_full else VIEWS_CROP
    return template.replace("{image}", image).replace("{label}", label or "unknown").replace("{views}", views)


def _json_object(reply: str) -> dict | None:
    """The first JSON object in ``reply`` (inside a fenced block if there is one), or None."""
    fenced = _FENCE.search(reply)
    text = fenced.group(1) if fenced else reply
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return obj if isinstance(obj, dict) else None
    return None


def _strip_letters(options: list[str]) -> list[str]:
    """Drop "A. " ... "D. " prefixes when all four options carry them in order (writers often add them)."""
    found = [_LETTER_PREFIX.match(o) for o in options]
    if all(m and m.group(1).upper() == "ABCD"[i] for i, m in enumerate(found)):
        return [o[m.end() :].strip() for o, m in zip(options, found) if m]
    return options


def parse_question(reply: str) -> tuple[WrittenQuestion | None, str | None]:
    """``(question, None)`` for a usable reply, else ``(None, reason)`` with a reason from :data:`WRITER_DROPS`."""
    obj = _json_object(reply)
    if obj is None:
        return None, "writer_invalid_json"
    question, options, answer = obj.get("question"), obj.get("options"), obj.get("answer")
    if not isinstance(question, str) or not question.strip():
        return None, "writer_bad_fields"
    if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) and o.strip() for o in options):
        return None, "writer_bad_fields"
    options = _strip_letters([o.strip() for o in options])
    if len({o.casefold() for o in options}) != 4 or not all(options):
        return None, "writer_bad_fields"
    if not isinstance(answer, str) or not answer.strip():
        return None, "writer_answer_not_in_options"
    letter = answer.strip().strip("()[]*.:, ").upper()
    prefix = _LETTER_PREFIX.match(answer)
    if letter not in ("A", "B", "C", "D") and prefix:  # "B. blue", "(B) blue"
        letter = prefix.group(1).upper()
    if letter not in ("A", "B", "C", "D"):
        hits = [i for i, o in enumerate(options) if o.casefold() == answer.strip().casefold()]
        if len(hits) != 1:
            return None, "writer_answer_not_in_options"
        letter = "ABCD"[hits[0]]
    return WrittenQuestion(question.strip(), options, letter), None
