"""Stage 3 of ``vopd data build``: keep a question when a filter model's sampled answers agree with the writer.

The paper kept a Vision-OPD-6K question when a strong model's sampled answers on the region agreed
more than 75 % of the time. Here the filter answers each question ``K`` times on the crop (the
teacher's view, the multiple-choice prompt of training without the hint); each answer's option
letter is read by the rule-based grader (:func:`vopd.grading.extract_choice`; an answer without a
letter is a vote for none). With ``m`` the most frequent letter (a tie: no majority):

    keep  <=>  m == writer's answer  and  count(m) / K > agree

``agree`` = 0.75 with K = 8 keeps a question when at least 7 of 8 answers are the writer's.
With ``drop_easy`` the same rule is applied to K answers on the clean full image; a question
that passes it there too is dropped as too easy (the full image already shows the detail, so
there is no regional-to-global gap to learn from).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from vopd.grading import extract_choice

__all__ = ["FILTER_DROPS", "Votes", "count_votes", "crop_verdict", "passes"]

#: Why a question did not survive the filter (the summary counts each).
FILTER_DROPS = ("filter_failed", "filter_disagrees", "filter_unsure", "filter_too_easy")


@dataclass(frozen=True)
class Votes:
    """The letters read from ``K`` sampled answers, their majority (None on a tie or no letter) and its share."""

    letters: tuple[str | None, ...]
    majority: str | None
    share: float

    def as_dict(self) -> dict[str, object]:
        return {"letters": list(self.letters), "majority": self.majority, "share": round(self.share, 4)}


def count_votes(replies: list[str], options: list[str]) -> Votes:
    """Read an option letter from each reply and find the majority."""
    letters = tuple(extract_choice(r, options, n_options=len(options)) for r in replies)
    counts = Counter(x for x in letters if x is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return Votes(letters, None, 0.0)
    letter, count = counts[0]
    return Votes(letters, letter, count / len(replies))


def passes(votes: Votes, answer: str, agree: float) -> bool:
    """The paper's rule: the majority is ``answer`` and holds more than ``agree`` of the samples."""
    return votes.majority == answer and votes.share > agree


def crop_verdict(votes: Votes, answer: str, agree: float) -> str | None:
    """None when kept; else ``filter_disagrees`` (another or no majority) or ``filter_unsure`` (too few agree)."""
    if votes.majority != answer:
        return "filter_disagrees"
    return None if votes.share > agree else "filter_unsure"
