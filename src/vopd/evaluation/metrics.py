"""Metric arithmetic on graded items. All accuracies are percentages (0-100).

The headline of every metric follows the official scripts: an item without a verdict (its
request failed after the retries, or the judge failed) counts as **wrong**, as a missing answer
does there, so a flaky server cannot raise a score. Beside it, ``judged_accuracy`` leaves those
items out, and the counts say how many there were (``failed``, ``judge_failed``, ``unparsed``;
``unjudged`` = failed + judge_failed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from vopd.evaluation.types import GradedItem

__all__ = [
    "accuracy",
    "by_group",
    "outcome_counts",
    "pair_accuracy",
    "pope_metrics",
    "rotation_mean",
]


def _pct(num: float, den: float) -> float | None:
    return None if den == 0 else 100.0 * num / den


def outcome_counts(graded: Iterable[GradedItem]) -> dict[str, int]:
    """How many items were ``failed`` (no reply), ``judge_failed`` and ``unparsed`` (graded wrong)."""
    counts = {"failed": 0, "judge_failed": 0, "unparsed": 0}
    for g in graded:
        if g.status in counts:
            counts[g.status] += 1
    return counts


def accuracy(graded: Iterable[GradedItem]) -> dict[str, Any]:
    """Headline ``accuracy`` (items without a verdict count as wrong) and ``judged_accuracy``.

    Returns ``accuracy, judged_accuracy, n`` (all items), ``judged, correct, unjudged`` and the
    :func:`outcome_counts`.
    """
    graded = list(graded)
    correct = sum(g.correct is True for g in graded)
    judged = sum(g.correct is not None for g in graded)
    return {
        "accuracy": _pct(correct, len(graded)),
        "judged_accuracy": _pct(correct, judged),
        "n": len(graded),
        "judged": judged,
        "correct": correct,
        "unjudged": len(graded) - judged,
        **outcome_counts(graded),
    }


def by_group(graded: Sequence[GradedItem], key: Callable[[GradedItem], str | None]) -> dict[str, dict[str, Any]]:
    """:func:`accuracy` per group (items whose key is ``None`` are skipped), sorted by name."""
    groups: dict[str, list[GradedItem]] = defaultdict(list)
    for g in graded:
        name = key(g)
        if name is not None:
            groups[str(name)].append(g)
    return {name: accuracy(groups[name]) for name in sorted(groups)}


def rotation_mean(
    graded: Sequence[GradedItem],
    rotation: Callable[[GradedItem], str],
    group: Callable[[GradedItem], str | None] | None = None,
) -> dict[str, Any]:
    """Accuracy per option rotation, then the mean over rotations (HR-Bench's protocol).

    With ``group`` (e.g. single vs cross), each group's score is also a mean over rotations.
    Returns ``{"overall", "judged_overall", "per_rotation", "groups"}``; ``overall`` is the
    mean over rotations of each rotation's accuracy on all its items (no verdict = wrong),
    ``judged_overall`` the same over judged items only.
    """
    rotations: dict[str, list[GradedItem]] = defaultdict(list)
    for g in graded:
        rotations[str(rotation(g))].append(g)
    per_rotation = {r: accuracy(items) for r, items in sorted(rotations.items())}
    overall = _mean([v["accuracy"] for v in per_rotation.values()])
    judged_overall = _mean([v["judged_accuracy"] for v in per_rotation.values()])
    groups: dict[str, float | None] = {}
    if group is not None:
        names = sorted({str(group(g)) for g in graded if group(g) is not None})
        for name in names:
            per = [accuracy([g for g in items if str(group(g)) == name])["accuracy"] for items in rotations.values()]
            groups[name] = _mean(per)
    return {"overall": overall, "judged_overall": judged_overall, "per_rotation": per_rotation, "groups": groups}


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pair_accuracy(graded: Sequence[GradedItem], pair: Callable[[GradedItem], str]) -> dict[str, Any]:
    """Share of pairs (or groups) in which every question is right (MMVP's official metric).

    A pair with an unjudged member counts as wrong in ``accuracy`` and is left out of
    ``judged_accuracy``. Pairs with a single member are an error: the data lost a row and the
    metric would be meaningless.
    """
    pairs: dict[str, list[GradedItem]] = defaultdict(list)
    for g in graded:
        pairs[str(pair(g))].append(g)
    lonely = [p for p, items in pairs.items() if len(items) < 2]
    if lonely:
        raise ValueError(f"pairs with a single question: {lonely[:5]}; every pair needs both rows")
    right = judged = 0
    for items in pairs.values():
        if any(g.correct is None for g in items):
            continue
        judged += 1
        right += int(all(g.correct for g in items))
    return {
        "accuracy": _pct(right, len(pairs)),
        "judged_accuracy": _pct(right, judged),
        "n": len(pairs),
        "judged": judged,
        "correct": right,
        "unjudged": len(pairs) - judged,
    }


def pope_metrics(graded: Sequence[GradedItem]) -> dict[str, Any]:
    """POPE accuracy, precision, recall, F1 (positive = "yes") and the yes-ratio of predictions.

    Replies are read as POPE's own script reads them (see :func:`vopd.grading.pope_answer`),
    so every reply is a yes or a no. An item without a reply counts as the wrong answer (a false
    negative when the truth is yes, a false positive when it is no), as a missing answer is
    wrong in the official count; ``judged_*`` values leave those items out. The yes-ratio is the
    share of *predicted* "yes" among replies (a model that always says yes has 100 even on a
    balanced set).
    """
    cells = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    judged = dict(cells)
    for g in graded:
        truth = g.item.answer.strip().lower()
        said = g.extracted if g.extracted in ("yes", "no") and g.correct is not None else None
        if said is not None:
            cell = ("tp" if said == "yes" else "fn") if truth == "yes" else ("fp" if said == "yes" else "tn")
            judged[cell] += 1
        else:
            cell = "fn" if truth == "yes" else "fp"
        cells[cell] += 1
    out = _pope_cells(cells)
    inner = _pope_cells(judged)
    return {
        **out,
        "judged_accuracy": inner["accuracy"],
        "judged_f1": inner["f1"],
        "yes_ratio": inner["yes_ratio"],
        "judged": inner["n"],
        "unjudged": out["n"] - inner["n"],
        **outcome_counts(graded),
        "confusion": cells,
    }


def _pope_cells(c: dict[str, int]) -> dict[str, Any]:
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    precision = _pct(tp, tp + fp)
    recall = _pct(tp, tp + fn)
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": _pct(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": _pct(tp + fp, n),
        "n": n,
    }
