"""The benchmarks' own rule-based answer readers, for ``vopd eval --parse official``.

vopd's rules (:mod:`vopd.grading`) read more replies than the benchmarks' scripts do (full-width
and lower-case letters, "Answer: B", ``<answer>``, ``\\boxed{}``, think blocks, an option's text),
and refuse replies that hedge or negate. On clean replies both agree; on verbose replies they can
differ by tens of points. ``--parse official`` reads each reply as the benchmark's published
scorer does, quirks included, so the number can stand next to a leaderboard's. Each reader below
is written from the script's published behaviour (docs/evaluation.md names the script and lists
the quirks); every verdict is settled (the scripts have no "unsure"), and no judge is asked.

Benchmarks whose official scorer is not a rule on the reply have no reader here: V* (its authors
score the likelihood of each option, not a generated reply), HR-Bench, ZoomBench and VisualProbe
(an LLM judge). ``--parse official`` keeps vopd's rules for them, and the summary says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vopd.evaluation.types import EvalItem
from vopd.grading import Verdict, pope_answer

__all__ = [
    "OFFICIAL_READERS",
    "OfficialReader",
    "cambrian_answer",
    "mme_rw_answer",
    "mmstar_match",
]

#: ``reader(prediction, item) -> Verdict`` (always settled).
OfficialReader = Callable[[str, EvalItem], Verdict]

# MME-RealWorld's eval_your_results.py strips these phrases. Two pairs in its list lack a comma,
# so Python joins them into one string each: "The best option is" and "Best answer:" alone are
# never stripped (and "Best answer: C" then reads the B of "Best").
_MME_RW_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",  # noqa: ISC001 - reproduces the script's missing comma
    "Best answer:Best option:",  # noqa: ISC001 - likewise
)


def mme_rw_answer(reply: str, choices: list[str]) -> str:
    """The letter MME-RealWorld's ``eval_your_results.py`` reads from a reply ("" for none).

    Strip the reply and remove the listed phrases; a reply of more than 10 words without a
    capital A-E reads nothing; else the first capital A-E *anywhere* (the "B" of "Based on ...");
    else the first published choice (``"(A) text"``) that contains the reply, lower-cased, read
    as the choice's second character. An empty reply is contained in every choice, so it reads "A".
    """
    s = reply.strip()
    for prefix in _MME_RW_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    match = re.search(r"[ABCDE]", s)
    if match is None:
        for choice in choices:
            if s.lower() in choice.lower():
                return choice[1]
        return ""
    return match[0]


def mmstar_match(reply: str, answer: str) -> tuple[bool, str | None]:
    """MMStar's exact match (its published scorer, also lmms-eval's ``mmstar`` task): right when the
    lower-cased, stripped reply's first character is the answer, or the character after a leading
    "(", "option " or "the answer is ". Returns ``(right, the character compared)``; an empty
    reply is wrong. "Based on the image, C" is right when the answer is B."""
    truth = answer.lower().strip().replace("\n", " ")
    text = reply.lower().strip().replace("\n", " ")
    if not text:
        return False, None
    for prefix in ("(", "option ", "the answer is "):
        if text.startswith(prefix):
            read = text[len(prefix)] if len(text) > len(prefix) else None
            break
    else:
        read = text[0]
    right = truth == text[0]
    if not right and text[0] == "(":
        right = len(text) > 1 and truth == text[1]
    elif not right and text[0:7] == "option ":
        right = truth == text[7]
    elif not right and text[0:14] == "the answer is ":
        right = truth == text[14]
    return right, read.upper() if read else None


def cambrian_answer(reply: str, *, strip: str = ".:,", first_char: bool = True) -> str:
    """The answer Cambrian-1's scorers (by the authors of CV-Bench and MMVP) read from a reply.

    Lower-case and strip; cut after the last "answer is" / "answer is:" / "answer:" (each checked
    in turn); strip again, drop trailing ``strip`` characters, a leading "(" and a trailing ")";
    with ``first_char`` keep only the first character ("b) red" reads "b", "blue" reads "b" too).
    """
    text = reply.lower().strip()
    for keyword in ("answer is", "answer is:", "answer:"):
        if keyword in text:
            text = text.split(keyword)[-1]
    text = text.strip().rstrip(strip).lstrip("(").rstrip(")")
    if first_char and len(text) > 1:
        text = text[0]
    return text


def _mme_rw(prediction: str, item: EvalItem) -> Verdict:
    choices = item.meta.get("choices") or [f"({'ABCDE'[i]}) {o}" for i, o in enumerate(item.options)]
    read = mme_rw_answer(prediction, choices)
    return Verdict(read == item.answer, True, read or None, "official:mme_rw")


def _mmstar(prediction: str, item: EvalItem) -> Verdict:
    right, read = mmstar_match(prediction, item.answer)
    return Verdict(right, True, read, "official:mmstar")


def _pope(prediction: str, item: EvalItem) -> Verdict:
    said = pope_answer(prediction)  # the raw reply: POPE's script strips nothing
    return Verdict(said == item.answer, True, said, "official:pope")


def _cvbench(prediction: str, item: EvalItem) -> Verdict:
    # Cambrian's Omni3D scorer strips ".:," and also accepts the option's text (which can only
    # match a one-character option, the reply being cut to one character); its COCO scorer
    # strips "." and takes the letter only. ADE20K is scored like COCO.
    omni = str(item.meta.get("source") or "").lower().startswith("omni")
    read = cambrian_answer(prediction, strip=".:," if omni else ".")
    truth = item.answer.lower()
    index = "abcdefgh".find(truth)
    text = item.options[index] if omni and 0 <= index < len(item.options) else None
    return Verdict(read == truth or (text is not None and read == text), True, read.upper() or None, "official:cvbench")


def _mmvp(prediction: str, item: EvalItem) -> Verdict:
    # Cambrian's MMVP scorer keeps the whole cleaned reply: the letter or the option's text, exactly.
    read = cambrian_answer(prediction, first_char=False)
    truth = item.answer.lower()
    index = "abcdefgh".find(truth)
    text = item.options[index].lower() if 0 <= index < len(item.options) else None
    return Verdict(read == truth or read == text, True, read or None, "official:mmvp")


#: Benchmark name -> its official reader; benchmarks not named keep vopd's rules.
OFFICIAL_READERS: dict[str, OfficialReader] = {
    "mme_rw_en": _mme_rw,
    "mme_rw_cn": _mme_rw,
    "mme_rw_lite": _mme_rw,
    "mmstar": _mmstar,
    "pope": _pope,
    "cvbench": _cvbench,
    "mmvp": _mmvp,
}
