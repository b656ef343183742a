"""Rule-based grading: option letters, yes/no words and normalised text.

Rules run first and settle the large majority of answers. A rule either settles an item
(``Verdict.settled``) or says it cannot; only then may an LLM judge be asked (see
:mod:`vopd.evaluation.judge`). A core module (no imports from vopd): the evaluation package and the
trainer's teacher-health probe both grade with it. ``vopd.evaluation.grading`` re-exports it.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

__all__ = [
    "Verdict",
    "answer_span",
    "extract_choice",
    "extract_yes_no",
    "grade",
    "grade_choice",
    "grade_open",
    "grade_yes_no",
    "normalize_text",
]

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Verdict:
    """What the rules concluded.

    Attributes:
        correct: the verdict when settled; ``False`` when unsettled (the fallback if no judge).
        settled: ``True`` when a rule decided; ``False`` when a judge should be asked.
        extracted: what the rule read from the prediction (a letter, "yes"/"no", or text).
        method: which rule decided, for reports and debugging.
    """

    correct: bool
    settled: bool
    extracted: str | None
    method: str


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# "Answer: X", "The answer is X", "Final answer: X" (last occurrence wins: models restate).
_ANSWER_MARKER = re.compile(r"(?:final\s+answer|correct\s+answer|answer\s+is|answer)\s*[:：]?\s*", re.IGNORECASE)


def answer_span(text: str) -> str:
    """Return the part of a response that holds the answer.

    Drops ``<think>`` blocks (and an unclosed think block's preamble), then prefers
    ``<answer>...</answer>``, then ``\\boxed{...}``, then the text after the last
    "Answer:" / "answer is", and otherwise the whole response.
    """
    text = _THINK.sub("", text)
    if "</think>" in text.lower():
        text = text[text.lower().rindex("</think>") + len("</think>") :]
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        rest = text[markers[-1].end() :].strip()
        if rest:
            return rest
    return text.strip()


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, drop punctuation and English articles, squeeze whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in string.punctuation or ch in "，。：；！？、（）" else ch for ch in text)
    words = [w for w in text.split() if w not in {"a", "an", "the"}]
    return " ".join(words)


def _choice_patterns(letters: str) -> list[re.Pattern[str]]:
    cls = f"[{letters}{letters.lower()}]"
    return [
        # the whole span is a letter: "B", "(b)", "B.", "**B**"
        re.compile(rf"^\W*({cls})\W*$"),
        # leads with a letter then punctuation: "B. red", "(B) red", "B) red", "B: red"
        re.compile(rf"^\W*\(({cls})\)|^\W*({cls})[\.\):：,]"),
        # "option B", "choice (C)", "answer is D"
        re.compile(rf"(?:option|choice|answer\s+is)\s*[:：]?\s*\(?({cls})\b", re.IGNORECASE),
        # a parenthesised letter anywhere: "... so (C) is right"
        re.compile(rf"\(({cls})\)"),
        # an upper-case letter standing alone with punctuation: "... is C."
        re.compile(rf"(?<![\w'])([{letters}])(?=[\.\):,]|\s*$)"),
    ]


def extract_choice(prediction: str, options: list[str] | None = None, *, n_options: int = 0) -> str | None:
    """Read the chosen option letter from a response, or ``None`` when there is none.

    Forms tried in order on :func:`answer_span`: a bare letter, a leading letter with
    punctuation, "option/choice/answer is X", "(X)" anywhere, a capital letter standing alone
    before punctuation; finally a unique normalised match with one option's text.
    Letters are limited to the number of options (``n_options`` or ``len(options)``).
    """
    count = n_options or (len(options) if options else 0) or 5
    letters = LETTERS[:count]
    span = unicodedata.normalize("NFKC", answer_span(prediction))  # full-width "（B）" -> "(B)"
    for pattern in _choice_patterns(letters):
        match = pattern.search(span)
        if match:
            letter = next(g for g in match.groups() if g)
            return letter.upper()
    if options:
        norm = normalize_text(span)
        hits = [i for i, opt in enumerate(options) if normalize_text(opt) and normalize_text(opt) == norm]
        if len(hits) != 1:
            # a unique option whose text appears as whole words in the response
            hits = [
                i
                for i, opt in enumerate(options)
                if normalize_text(opt) and re.search(rf"\b{re.escape(normalize_text(opt))}\b", norm)
            ]
        if len(hits) == 1:
            return letters[hits[0]]
    return None


_YES = {"yes", "true", "correct", "是", "对"}
_NO = {"no", "false", "incorrect", "否", "不"}


def extract_yes_no(text: str) -> str | None:
    """Return ``"yes"``/``"no"`` from the first yes/no word of the answer span, else ``None``.

    Robust to case, markdown and punctuation: "Yes.", "**yes**", "Answer: No, ..." all parse.
    """
    words = normalize_text(answer_span(text)).split()
    for word in words[:50]:
        if word in _YES:
            return "yes"
        if word in _NO:
            return "no"
    return None


def grade_choice(prediction: str, answer: str, options: list[str] | None = None) -> Verdict:
    """Grade a multiple-choice response against the answer letter."""
    letter = extract_choice(prediction, options, n_options=len(options or []))
    # The reference may be written "B", "(B)", "B." or "B)"; a bare strip("()") left "B." unequal
    # to every prediction, so such items were always graded wrong.
    truth = answer.strip().strip("()[]*.:：, ").upper()
    if letter is None:
        return Verdict(False, False, None, "no_choice")
    return Verdict(letter == truth, True, letter, "choice")


def grade_yes_no(prediction: str, answer: str) -> Verdict:
    """Grade a yes/no response; the answer must be ``yes`` or ``no`` (any case)."""
    said = extract_yes_no(prediction)
    truth = extract_yes_no(answer)
    if said is None:
        return Verdict(False, False, None, "no_yes_no")
    return Verdict(said == truth, True, said, "yes_no")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def grade_open(prediction: str, answer: str) -> Verdict:
    """Grade a free-form answer by normalised text.

    Settled as right when the normalised span equals the normalised answer, or, for numeric
    answers, when the first number in the span equals it. Anything else is unsettled (a judge
    may decide); the unsettled fallback is right only if the answer appears as whole words.
    """
    span = answer_span(prediction)
    norm_pred, norm_truth = normalize_text(span), normalize_text(answer)
    if norm_truth and norm_pred == norm_truth:
        return Verdict(True, True, span, "exact")
    if _NUMBER.fullmatch(answer.strip()):
        numbers = _NUMBER.findall(span)
        if numbers:
            return Verdict(float(numbers[0]) == float(answer), True, numbers[0], "number")
    contained = bool(norm_truth) and re.search(rf"\b{re.escape(norm_truth)}\b", norm_pred) is not None
    return Verdict(contained, False, span, "contains" if contained else "no_match")


def grade(prediction: str, answer: str, kind: str, options: list[str] | None = None) -> Verdict:
    """Dispatch on ``kind`` (``choice``, ``yesno`` or ``open``)."""
    if kind == "choice":
        return grade_choice(prediction, answer, options)
    if kind == "yesno":
        return grade_yes_no(prediction, answer)
    if kind == "open":
        return grade_open(prediction, answer)
    raise ValueError(f"unknown answer kind {kind!r}; expected 'choice', 'yesno' or 'open'")
