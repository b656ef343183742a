"""HR-Bench 4K / 8K: 200 questions, each asked in 4 option rotations (800 rows).

Format (TSV or parquet): ``index, question, A, B, C, D, answer, category, cycle_category,
image`` (base64). ``category`` is ``single`` (FSP, fine-grained single-instance perception) or
``cross`` (FCP, cross-instance perception); ``cycle_category`` names the rotation. The score is
the accuracy of each rotation, averaged over rotations, overall and for single and cross.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from vopd.evaluation.benchmarks._io import choice_prompt, image_source, letter, read_rows, require_columns
from vopd.evaluation.metrics import accuracy, rotation_mean
from vopd.evaluation.types import EvalItem, GradedItem

GROUP_NAMES = {"single": "FSP", "cross": "FCP"}


def make_load(name: str):
    """A loader that tags items with benchmark ``name`` (``hrbench_4k`` or ``hrbench_8k``)."""

    def load(source: str | Path, *, seed: int = 0) -> list[EvalItem]:
        rows, base = read_rows(source, (".tsv", ".parquet"))
        seen: dict[str, int] = defaultdict(int)
        items = []
        for row in rows:
            require_columns(row, ("index", "question", "A", "B", "answer", "image"), "HR-Bench")
            options = [str(row[k]) for k in "ABCD" if row.get(k) not in (None, "", "nan")]
            # Without cycle_category, the n-th time a question text appears is its n-th rotation.
            rotation = row.get("cycle_category")
            if rotation in (None, ""):
                rotation = seen[row["question"]]
                seen[row["question"]] += 1
            items.append(
                EvalItem(
                    benchmark=name,
                    id=str(row["index"]),
                    image=image_source(row["image"], base, row["_where"]),
                    prompt=choice_prompt(str(row["question"]), options, style="dot"),
                    answer=letter(row["answer"]),
                    options=options,
                    category=row.get("category"),
                    question=str(row["question"]),
                    meta={"rotation": str(rotation)},
                )
            )
        return items

    return load


def score(graded: list[GradedItem]) -> dict:
    """Mean over rotations, overall and per category; also the pooled accuracy."""
    rot = rotation_mean(graded, lambda g: g.item.meta["rotation"], lambda g: g.item.category)
    groups = {f"{GROUP_NAMES.get(k, k)} ({k})": v for k, v in rot["groups"].items()}
    pooled = accuracy(graded)
    return {
        "overall": rot["overall"],
        "groups": groups,
        "per_rotation": rot["per_rotation"],
        "pooled_accuracy": pooled["accuracy"],
        "n": pooled["n"],
        "unjudged": pooled["unjudged"],
    }
