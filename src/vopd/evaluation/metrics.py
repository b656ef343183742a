"""Metric arithmetic on graded items. All accuracies are percentages (0-100).

Unjudged items (``correct is None``) are left out of every denominator and reported as a
count, so a judge outage lowers ``n`` instead of silently lowering accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from vopd.evaluation.types import GradedItem

__all__ = [
    "accuracy",
    "by_group",
    "pair_accuracy",
    "pope_metrics",
    "rotation_mean",
]


def _pct(num: float, den: float) -> float | None:
    return None if den == 0 else 100.0 * num / den


def accuracy(graded: Iterable[GradedItem]) -> dict[str, Any]:
    """``{"accuracy", "n", "correct", "unjudged"}`` where ``n`` counts judged items only."""
    correct = judged = unjudged = 0
    for g in graded:
        if g.correct is None:
            unjudged += 1
        else:
            judged += 1
            correct += int(g.correct)
    return {"accuracy": _pct(correct, judged), "n": judged, "correct": correct, "unjudged": unjudged}


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
    Returns ``{"overall", "per_rotation", "groups"}``; ``overall`` is the mean over rotations
    of each rotation's accuracy on all its items.
    """
    rotations: dict[str, list[GradedItem]] = defaultdict(list)
    for g in graded:
        rotations[str(rotation(g))].append(g)
    per_rotation = {r: accuracy(items) for r, items in sorted(rotations.items())}
    overall = _mean([v["accuracy"] for v in per_rotation.values()])
    groups: dict[str, float | None] = {}
    if group is not None:
        names = sorted({str(group(g)) for g in graded if group(g) is not None})
        for name in names:
            per = [accuracy([g for g in items if str(group(g)) == name])["accuracy"] for items in rotations.values()]
            groups[name] = _mean(per)
    return {"overall": overall, "per_rotation": per_rotation, "groups": groups}


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pair_accuracy(graded: Sequence[GradedItem], pair: Callable[[GradedItem], str]) -> dict[str, Any]:
    """Share of pairs (or groups) in which every question is right (MMVP's official metric).

    A pair with an unjudged member is unjudged. Pairs with a single member are an error: the
    data lost a row and the metric would be meaningless.
    """
    pairs: dict[str, list[GradedItem]] = defaultdict(list)
    for g in graded:
        pairs[str(pair(g))].append(g)
    lonely = [p for p, items in pairs.items() if len(items) < 2]
    if lonely:
        raise ValueError(f"pairs with a single question: {lonely[:5]}; every pair needs both rows")
    right = judged = unjudged = 0
    for items in pairs.values():
        if any(g.correct is None for g in items):
            unjudged += 1
            continue
        judged += 1
        right += int(all(g.correct for g in items))
    return {"accuracy": _pct(right, judged), "n": judged, "correct": right, "unjudged": unjudged}


def pope_metrics(graded: Sequence[GradedItem]) -> dict[str, Any]:
    """POPE accuracy, precision, recall, F1 (positive = "yes") and the yes-ratio of predictions.

    The yes-ratio is the share of *predicted* "yes" among parsed predictions (a model that
    always says yes has ratio 100 even on a balanced set). Responses without a yes/no word
    are unjudged.
    """
    tp = fp = tn = fn = unjudged = 0
    for g in graded:
        said = g.extracted if g.extracted in ("yes", "no") else None
        if said is None or g.correct is None:
            unjudged += 1
            continue
        truth = g.item.answer.strip().lower()
        if said == "yes":
            tp, fp = (tp + 1, fp) if truth == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if truth == "no" else (tn, fn + 1)
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
        "unjudged": unjudged,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }
