"""CV-Bench (2D: counting and relations on ADE20K / COCO; 3D: depth and distance on Omni3D).

Format (parquet or JSONL): ``idx, type, task, image, prompt, choices, answer, source`` with
``answer`` like ``(A)`` and ``prompt`` holding the question and options. Official score:
2D = mean of the ADE20K and COCO accuracies, 3D = Omni3D accuracy, overall = mean of 2D and 3D.
"""

from __future__ import annotations

from pathlib import Path

from vopd.evaluation.benchmarks._io import CHOICE_INSTRUCTION, image_source, letter, read_rows, require_columns
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem

NAME = "cvbench"


def load(source: str | Path, *, seed: int = 0) -> list[EvalItem]:
    rows, base = read_rows(source, (".parquet", ".jsonl"))
    items = []
    for n, row in enumerate(rows):
        require_columns(row, ("type", "image", "prompt", "choices", "answer"), "CV-Bench")
        items.append(
            EvalItem(
                benchmark=NAME,
                id=str(row.get("idx", n)),
                image=image_source(row["image"], base, row["_where"]),
                prompt=f"{row['prompt']}\n{CHOICE_INSTRUCTION}",
                answer=letter(row["answer"]),
                options=[str(c) for c in row["choices"]],
                category=str(row["type"]).upper(),
                question=str(row.get("question", row["prompt"])),
                meta={"source": row.get("source"), "task": row.get("task")},
            )
        )
    return items


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def score(graded: list[GradedItem]) -> dict:
    """2D (mean over its sources), 3D, their mean, and per task."""
    two_d = [g for g in graded if g.item.category == "2D"]
    sources = by_group(two_d, lambda g: g.item.meta.get("source"))
    acc_2d = _mean([v["accuracy"] for v in sources.values()]) if sources else accuracy(two_d)["accuracy"]
    acc_3d = accuracy([g for g in graded if g.item.category == "3D"])["accuracy"]
    pooled = accuracy(graded)
    return {
        "overall": _mean([acc_2d, acc_3d]),
        "2D": acc_2d,
        "3D": acc_3d,
        "sources": by_group(graded, lambda g: g.item.meta.get("source")),
        "tasks": by_group(graded, lambda g: g.item.meta.get("task")),
        "n": pooled["n"],
        "unjudged": pooled["unjudged"],
    }
