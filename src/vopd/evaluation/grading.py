"""Rule-based grading: the rules live in :mod:`vopd.grading` (a core module the trainer's health
probe uses too) and are re-exported here; this module adds the benchmark-specific reader of
POPE and a :func:`grade` that knows it."""

from __future__ import annotations

from vopd.grading import (
    LETTERS,
    Verdict,
    answer_span,
    extract_choice,
    extract_yes_no,
    grade_choice,
    grade_open,
    grade_yes_no,
    normalize_text,
    strip_think,
)
from vopd.grading import grade as grade_rules

__all__ = [
    "LETTERS",
    "Verdict",
    "answer_span",
    "extract_choice",
    "extract_yes_no",
    "grade",
    "grade_choice",
    "grade_open",
    "grade_pope",
    "grade_yes_no",
    "normalize_text",
    "pope_answer",
]


def pope_answer(text: str) -> str:
    """Read a reply as POPE's official evaluation script does: ``"no"`` or ``"yes"``, never unsure.

    Only the first sentence counts (up to the first period); commas are dropped, the rest split
    on spaces; the reply is "no" if one of the words is exactly ``No``, ``no`` or ``not``, and
    "yes" otherwise, also when it holds neither word.
    """
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def grade_pope(prediction: str, answer: str) -> Verdict:
    """Grade a POPE reply with :func:`pope_answer` after dropping its reasoning (``<think>``).

    POPE's own script reads the raw reply, so under ``--thinking`` it would read the first
    sentence of the reasoning; lmms-eval strips think tags first, and so does vopd. A reply that
    is all reasoning (cut off inside an unclosed ``<think>``) holds no answer: unsettled. Any
    other reply is settled, as in the official script.
    """
    reply = strip_think(prediction).strip()
    if not reply and prediction.strip() and "think>" in prediction.lower():
        return Verdict(False, False, None, "no_yes_no")
    said = pope_answer(reply)
    return Verdict(said == answer.strip().lower(), True, said, "pope")


def grade(prediction: str, answer: str, kind: str, options: list[str] | None = None) -> Verdict:
    """Dispatch on ``kind``: ``pope`` here, ``choice``, ``yesno`` and ``open`` in :mod:`vopd.grading`."""
    if kind == "pope":
        return grade_pope(prediction, answer)
    return grade_rules(prediction, answer, kind, options)
