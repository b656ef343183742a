"""ZoomBench (845 questions, each with the full image and a crop around the evidence).

Published as ``inclusionAI/ZoomBench`` (``data/test.parquet``): ``id, query, response, image,
crop_image``; ``response`` is the ground truth; ``crop_image`` may be null (both official
readers tolerate that). An optional ``dimension`` (or ``category``) column gives per-dimension
scores. Answers that are a single option letter are graded as choices, others as open
answers (judge optional). ``zoombench`` asks with the full image; ``zoombench_crop`` with the
crop (the crop view) and skips, with a note, the rows that have none; ``vopd gap`` uses both.

Prompt (the paper's): the query as published. Official score: accuracy.
"""

from __future__ import annotations

import re
from pathlib import Path

from vopd.evaluation.benchmarks.files import (
    DEFAULT_PROMPT,
    check_prompt,
    image_source,
    read_rows,
    require_columns,
    rows_base,
)
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

PROMPTS = ("paper",)
_OPTION = re.compile(r"^\s*\(?([A-H])[\.\):]\s*(.+)$", re.MULTILINE)
_DIMENSION_COLUMNS = ("dimension", "category", "type", "task")


def _has_image(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, dict):
        return bool(value.get("bytes") or value.get("path"))
    return value != ""


def make_load(name: str, view: str):
    """A loader whose items show the full image (``view="full"``) or the crop (``"crop"``)."""

    def load(
        source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
    ) -> ItemList:
        check_prompt(name, prompt, PROMPTS)
        rows = read_rows(source, (".parquet",))
        items = []
        no_crop = 0
        for row in rows:
            require_columns(row, ("id", "query", "response", "image"), "ZoomBench")
            base = rows_base(row, image_root)
            query, truth = str(row["query"]).strip(), str(row["response"]).strip()
            options = [m.group(2).strip() for m in _OPTION.finditer(query)]
            is_choice = bool(re.fullmatch(r"\(?[A-H]\)?\.?", truth))
            full = image_source(row["image"], base, row["_where"])
            crop = image_source(row["crop_image"], base, row["_where"]) if _has_image(row.get("crop_image")) else None
            if view == "crop" and crop is None:
                no_crop += 1
                continue
            dimension = next((row[c] for c in _DIMENSION_COLUMNS if row.get(c)), None)
            items.append(
                EvalItem(
                    benchmark=name,
                    id=str(row["id"]),
                    source=row["_source"],
                    image=crop if view == "crop" else full,
                    prompt=query,
                    answer=truth.strip("().") if is_choice else truth,
                    kind="choice" if is_choice else "open",
                    options=options,
                    category=dimension,
                    question=query,
                    meta={"crop_image": crop},
                )
            )
        notes = list(rows.notes)
        if no_crop:
            notes.append(f"{no_crop} rows without crop_image skipped (the crop view needs one)")
        return ItemList(items, files=rows.files, notes=notes)

    return load


def score(graded: list[GradedItem]) -> dict:
    """Overall and per dimension."""
    overall = accuracy(graded)
    return {
        "overall": overall["accuracy"],
        "judged_overall": overall["judged_accuracy"],
        **overall,
        "dimensions": by_group(graded, lambda g: g.item.category),
    }
