"""MMStar (1,500 vision-indispensable questions, 6 core capabilities).

Layouts: the snapshot ``Lin-Chen/MMStar`` (``mmstar.parquet``: ``index, question, image,
answer, category, l2_category, meta_info``; the question text holds the options as
``Options: A: ..., B: ..., C: ..., D: ...``) and VLMEvalKit's ``MMStar.tsv`` (base64 ``image``,
options also in columns ``A``-``D`` when present). A folder holding both reads the parquet only
(it is the same table). Official score (VLMEvalKit): accuracy; per category and l2 category.
"""

from __future__ import annotations

import re
from pathlib import Path

from vopd.evaluation.benchmarks.files import (
    CHOICE_INSTRUCTION,
    DEFAULT_PROMPT,
    check_prompt,
    image_source,
    letter,
    read_rows,
    require_columns,
    rows_base,
)
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

NAME = "mmstar"
#: ``paper``: the question as published (options included), then "Answer with the option's
#: letter from the given choices directly." One template only.
PROMPTS = ("paper",)
_OPTION = re.compile(r"(?:^|[\s,])([A-F]):\s*(.*?)(?=,\s*[A-F]:|\n|$)", re.DOTALL)


def load(
    source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
) -> ItemList:
    check_prompt(NAME, prompt, PROMPTS)
    rows = read_rows(source, (".parquet", ".tsv"))
    items = []
    for n, row in enumerate(rows):
        require_columns(row, ("question", "image", "answer"), "MMStar")
        question = str(row["question"])
        tail = question.split("Options:", 1)[1] if "Options:" in question else ""
        options = [m.group(2).strip() for m in _OPTION.finditer(tail)]
        if not options:
            options = [str(row[k]) for k in "ABCDEF" if row.get(k) not in (None, "", "nan")]
        items.append(
            EvalItem(
                benchmark=NAME,
                id=str(row.get("index", n)),
                source=row["_source"],
                image=image_source(row["image"], rows_base(row, image_root), row["_where"]),
                prompt=f"{question}\n{CHOICE_INSTRUCTION}",
                answer=letter(row["answer"]),
                options=options,
                category=row.get("category"),
                question=question,
                meta={"l2_category": row.get("l2_category", row.get("l2-category"))},
            )
        )
    return ItemList(items, files=rows.files, notes=rows.notes)


def score(graded: list[GradedItem]) -> dict:
    overall = accuracy(graded)
    return {
        "overall": overall["accuracy"],
        "judged_overall": overall["judged_accuracy"],
        **overall,
        "categories": by_group(graded, lambda g: g.item.category),
        "l2_categories": by_group(graded, lambda g: g.item.meta.get("l2_category")),
    }
