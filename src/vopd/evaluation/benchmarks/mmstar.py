"""MMStar (1,500 vision-indispensable questions, 6 core capabilities).

Format (parquet or TSV): ``index, question, image, answer, category, l2_category``; the
question text holds the options as ``Options: A: ..., B: ..., C: ..., D: ...``.
Scores: overall, per category and per l2 category.
"""

from __future__ import annotations

import re
from pathlib import Path

from vopd.evaluation.benchmarks._io import CHOICE_INSTRUCTION, image_source, letter, read_rows, require_columns
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem

NAME = "mmstar"
_OPTION = re.compile(r"(?:^|[\s,])([A-F]):\s*(.*?)(?=,\s*[A-F]:|\n|$)", re.DOTALL)


def load(source: str | Path, *, seed: int = 0) -> list[EvalItem]:
    rows, base = read_rows(source, (".parquet", ".tsv"))
    items = []
    for n, row in enumerate(rows):
        require_columns(row, ("question", "image", "answer"), "MMStar")
        question = str(row["question"])
        tail = question.split("Options:", 1)[1] if "Options:" in question else ""
        options = [m.group(2).strip() for m in _OPTION.finditer(tail)]
        items.append(
            EvalItem(
                benchmark=NAME,
                id=str(row.get("index", n)),
                image=image_source(row["image"], base, row["_where"]),
                prompt=f"{question}\n{CHOICE_INSTRUCTION}",
                answer=letter(row["answer"]),
                options=options,
                category=row.get("category"),
                question=question,
                meta={"l2_category": row.get("l2_category")},
            )
        )
    return items


def score(graded: list[GradedItem]) -> dict:
    overall = accuracy(graded)
    return {
        "overall": overall["accuracy"],
        **overall,
        "categories": by_group(graded, lambda g: g.item.category),
        "l2_categories": by_group(graded, lambda g: g.item.meta.get("l2_category")),
    }
