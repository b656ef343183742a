"""Rule-based grading: option letters, yes/no words and normalised text.

Rules run first and settle the large majority of answers. A rule either settles an item
(``Verdict.settled``) or says it cannot; only then may an LLM judge be asked (see
:mod:`vopd.evaluation.judge`). A core module (no imports from vopd): the evaluation package and the
trainer's teacher-health probe both grade with it. POPE's replies are read as POPE's own script
reads them (:func:`pope_answer`).
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
    "grade_pope",
    "grade_yes_no",
    "normalize_text",
    "pope_answer",
    "read_choice",
    "strip_think",
    "UNPARSED_METHODS",
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
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# "Answer: X", "The answer is X", "Final answer: X", "答案是 X" (last occurrence wins: models restate).
_ANSWER_MARKER = re.compile(
    r"(?:(?:final|correct|best)\s+answer|answer)(?:\s+is)?\s*[:：]?\s*|答案(?:是|为)?\s*[:：]?\s*", re.IGNORECASE
)


def strip_think(text: str) -> str:
    """Drop the reasoning of a reply: ``<think>...</think>`` blocks, the preamble before a lone
    ``</think>`` (templates that open the block in the prompt), and an opened block that never
    closes (the reply was cut off mid-reasoning, so it holds no answer)."""
    text = _THINK.sub("", text)
    low = text.lower()
    if "</think>" in low:
        text = text[low.rindex("</think>") + len("</think>") :]
    opened = _THINK_OPEN.search(text)
    if opened:
        text = text[: opened.start()]
    return text


def answer_span(text: str) -> str:
    """Return the part of a response that holds the answer.

    Drops the reasoning (:func:`strip_think`), then prefers ``<answer>...</answer>``, then
    ``\\boxed{...}``, then the text after the last "Answer:" / "answer is" / "答案是", and
    otherwise the whole response.
    """
    text = strip_think(text)
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


# CJK ideographs and CJK punctuation: a letter next to them stands alone ("答案是D", "选E。").
# Python's \w counts ideographs as word characters, so "no word character before" missed them.
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_NOT_ASCII_WORD_BEFORE = r"(?<![A-Za-z0-9_'])"
_NOT_ASCII_WORD_AFTER = r"(?![A-Za-z0-9_])"


def _choice_patterns(letters: str) -> list[re.Pattern[str]]:
    """Every way a reply names an option letter (each match is one mention)."""
    cls = f"[{letters}{letters.lower()}]"
    upper = f"[{letters}]"
    return [
        # the whole span is a letter: "B", "(b)", "B.", "**B**"
        re.compile(rf"^\W*({cls})\W*$"),
        # leads with a letter then punctuation: "B. red", "(B) red", "B) red", "B: red"
        re.compile(rf"^\W*\(({cls})\)|^\W*({cls})[\.\):：,，]"),
        # leads with a capital letter as the subject: "B is correct", "C is wrong"
        re.compile(rf"^\W*({upper})\s+(?:is|was)\b"),
        # "option B", "choice (C)", "answer is D"
        re.compile(rf"(?:option|choice|answer\s+is)\s*[:：]?\s*\(?({cls}){_NOT_ASCII_WORD_AFTER}", re.IGNORECASE),
        # a parenthesised letter anywhere: "... so (C) is right"
        re.compile(rf"\(({cls})\)"),
        # an upper-case letter standing alone with punctuation: "... is C.", "正确选项是E。"
        re.compile(rf"{_NOT_ASCII_WORD_BEFORE}({upper})(?=[\.\):,;!?。，、；：！？]|\s*$)"),
        # an upper-case letter next to CJK text: "答案是D", "选E", "B选项"
        re.compile(rf"(?<=[{_CJK}])({upper}){_NOT_ASCII_WORD_AFTER}|{_NOT_ASCII_WORD_BEFORE}({upper})(?=[{_CJK}])"),
        # letters joined as alternatives or a list: "C or D", "Both D and C", "either A or B", "C/D", "A和B"
        re.compile(
            rf"{_NOT_ASCII_WORD_BEFORE}\(?({upper})\)?\s*(?:,|，|、|/|&|\bor\b|\band\b|\bnor\b|或者?|和|与|还是)\s*"
            rf"\(?({upper}){_NOT_ASCII_WORD_AFTER}"
        ),
    ]


# A negation right before a named option ("not C", "isn't (C)", "neither A", "不是C") ...
_NEGATED_BEFORE = re.compile(
    r"(?:\b(?:not|no|never|neither|nor|except|excluding|rather\s+than|instead\s+of)|n't|不是|并非|不选|不应选|排除|除了|非)"
    r"\s*(?:(?:the\s+)?(?:option|choice|answer)\s*)?[:：]?\s*[\(\[]?$",
    re.IGNORECASE,
)
# ... or right after it ("C is wrong", "C isn't", "C is not correct", "C不对", "C是错的").
_NEGATED_AFTER = re.compile(
    r"^[\)\]]?\s*(?:(?:is|are|was|would\s+be|seems|looks)\s*(?:not\b|n't)|(?:(?:is|are|was)\s+)?"
    r"(?:wrong|incorrect|false)\b|是?错|不对|不正确|不是)",
    re.IGNORECASE,
)
# Any negation at all, for option text and open answers ("It is not red." must not read "red").
_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor|none|cannot)\b|n['’ ]t\b|[不没非否]", re.IGNORECASE)
# Words that offer alternatives ("red or blue", "either"): the reply names another candidate.
_ALTERNATIVE = re.compile(r"\b(?:or|either|maybe|perhaps)\b|或|还是|可能", re.IGNORECASE)

#: Unsettled rule outcomes in which no answer could be read (the item is ``unparsed`` without a judge).
UNPARSED_METHODS = frozenset({"no_choice", "several_options", "negated", "no_yes_no"})


def _words(text: str) -> str:
    """A pattern matching ``text`` as whole words; only ASCII letters and digits bound a word, so
    text glued to CJK characters ("不是red") still counts."""
    return rf"(?<![A-Za-z0-9]){re.escape(text)}(?![A-Za-z0-9])"


def _mentions(span: str, letters: str) -> list[tuple[str, int, int]]:
    """Every option letter the span names, as ``(letter, start, end)``."""
    found = []
    for pattern in _choice_patterns(letters):
        for match in pattern.finditer(span):
            for group in range(1, (pattern.groups or 0) + 1):
                if match.group(group):
                    found.append((match.group(group).upper(), match.start(group), match.end(group)))
    return found


def read_choice(prediction: str, options: list[str] | None = None, *, n_options: int = 0) -> tuple[str | None, str]:
    """Read the chosen option letter and say how: ``(letter, method)``.

    ``method`` is ``choice`` (a letter), ``option_text`` (an option's text), or, with no letter,
    ``several_options`` (the reply names two or more options: "C or D", "Not C, it is D"),
    ``negated`` (it names one option only to negate it: "Not C.", "It is not red.") or
    ``no_choice``.
    """
    count = n_options or (len(options) if options else 0) or 5
    letters = LETTERS[:count]
    span = unicodedata.normalize("NFKC", answer_span(prediction))  # full-width "（B）" -> "(B)"
    mentions = _mentions(span, letters)
    named = {letter for letter, _, _ in mentions}
    if len(named) > 1:
        # "B. Option A is wrong because ...": a reply that leads with one letter, not joined to
        # another ("C, D", "C or D") and not hedged ("B, or maybe C"), answers with it; every
        # official scorer reads such a reply as its leading letter too.
        lead = re.match(rf"^\W*\(?([{letters}])\)?(?:[\.\):：,，]|\s+(?:is|was)\b|$)", span)
        joined = _choice_patterns(letters)[-1].match(span)
        if lead is None or joined is not None or _ALTERNATIVE.search(span) or _NEGATED_AFTER.match(span[lead.end(1) :]):
            return None, "several_options"
        return lead.group(1), "choice"
    if named:
        negated = any(
            _NEGATED_BEFORE.search(span[:start]) or _NEGATED_AFTER.match(span[end:]) for _, start, end in mentions
        )
        return (None, "negated") if negated else (named.pop(), "choice")
    if options:
        norm = normalize_text(span)
        texts = [normalize_text(opt) for opt in options]
        hits = [i for i, text in enumerate(texts) if text and text == norm]
        if len(hits) == 1:
            return letters[hits[0]], "option_text"
        # options whose text appears as whole words in the response
        hits = [i for i, text in enumerate(texts) if text and re.search(_words(text), norm)]
        if len(hits) > 1:
            return None, "several_options"
        if len(hits) == 1:
            rest = re.sub(_words(texts[hits[0]]), " ", norm)
            if _NEGATION.search(rest):
                return None, "negated"
            return letters[hits[0]], "option_text"
    return None, "no_choice"


def extract_choice(prediction: str, options: list[str] | None = None, *, n_options: int = 0) -> str | None:
    """Read the chosen option letter from a response, or ``None`` when there is none.

    The letter forms, tried on :func:`answer_span`: a bare letter, a leading letter with
    punctuation, "option/choice/answer is X", "(X)" anywhere, a capital letter standing alone
    before punctuation or next to CJK text ("答案是D"), letters joined by "or"/"and"/","; then an
    option's text. A reply that names two options ("C or D", "Not C, it is D") or negates the
    one it names ("Not C.", "It is not red.") gives ``None``: it is not an answer. Letters are
    limited to the number of options (``n_options`` or ``len(options)``). See :func:`read_choice`.
    """
    return read_choice(prediction, options, n_options=n_options)[0]


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
    """Grade a multiple-choice response against the answer letter.

    Unsettled (method ``no_choice``, ``several_options`` or ``negated``) when no single option
    can be read; a judge may then decide, and without one the item is wrong.
    """
    letter, method = read_choice(prediction, options, n_options=len(options or []))
    # The reference may be written "B", "(B)", "B." or "B)"; a bare strip("()") left "B." unequal
    # to every prediction, so such items were always graded wrong.
    truth = answer.strip().strip("()[]*.:：, ").upper()
    if letter is None:
        return Verdict(False, False, None, method)
    return Verdict(letter == truth, True, letter, "choice")


def grade_yes_no(prediction: str, answer: str) -> Verdict:
    """Grade a yes/no response; the answer must be ``yes`` or ``no`` (any case)."""
    said = extract_yes_no(prediction)
    truth = extract_yes_no(answer)
    if said is None:
        return Verdict(False, False, None, "no_yes_no")
    return Verdict(said == truth, True, said, "yes_no")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def grade_open(prediction: str, answer: str, options: list[str] | None = None) -> Verdict:
    """Grade a free-form answer by normalised text.

    Settled as right when the normalised span equals the normalised answer; for a numeric
    answer, settled by the span's number when it names exactly one ("Between 6 and 8, so 7."
    names three and is left to the judge). Anything else is unsettled (a judge may decide). The
    unsettled fallback (no judge) credits a reply only if the answer appears in it as whole
    words and the reply holds no negation ("not red but blue"), no alternative ("red or blue"),
    no other number (numeric answers) and no other option's text (``options``, when given).
    """
    span = answer_span(prediction)
    norm_pred, norm_truth = normalize_text(span), normalize_text(answer)
    if norm_truth and norm_pred == norm_truth:
        return Verdict(True, True, span, "exact")
    numeric = _NUMBER.fullmatch(answer.strip()) is not None
    numbers = _NUMBER.findall(span)
    if numeric and numbers:
        values = {float(n) for n in numbers}
        if len(values) == 1:
            return Verdict(values.pop() == float(answer), True, numbers[0], "number")
    contained = bool(norm_truth) and re.search(_words(norm_truth), norm_pred) is not None
    if not contained:
        return Verdict(False, False, span, "no_match")
    rest = re.sub(_words(norm_truth), " ", norm_pred)
    others = [normalize_text(o) for o in options or [] if normalize_text(o) and normalize_text(o) != norm_truth]
    hedged = (
        _NEGATION.search(rest) is not None
        or _ALTERNATIVE.search(rest) is not None
        or (numeric and any(float(n) != float(answer) for n in numbers))
        or any(re.search(_words(o), rest) for o in others)
    )
    return Verdict(not hedged, False, span, "contains_hedged" if hedged else "contains")


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
    """Dispatch on ``kind`` (``choice``, ``yesno``, ``pope`` or ``open``)."""
    if kind == "pope":
        return grade_pope(prediction, answer)
    if kind == "choice":
        return grade_choice(prediction, answer, options)
    if kind == "yesno":
        return grade_yes_no(prediction, answer)
    if kind == "open":
        return grade_open(prediction, answer, options)
    raise ValueError(f"unknown answer kind {kind!r}; expected 'choice', 'yesno', 'pope' or 'open'")
