"""ZoomBench (845 questions, each with the full image and a crop around the evidence).

Format (parquet): ``id, query, response, image, crop_image``; ``response`` is the ground truth.
An optional ``dimension`` (or ``category``) column gives per-dimension scores. Answers that
are a single option letter are graded as choices, others as open answers (judge optional).
``zoombench`` asks with the full image; ``zoombench_crop`` with the crop (the regional view);
``vopd gap`` uses both.
"""

from __future__ import annotations

import re
from pathlib import Path

from vopd.evaluation.benchmarks._io import image_source, read_rows, require_columns
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem

_OPTION = re.compile(r"^\s*\(?([A-H])[\.\):]\s*(.+)$", re.MULTILINE)
_DIMENSION_COLUMNS = ("dimension", "category", "type", "task")


def make_load(name: str, view: str):
    """A loader whose items show the full image (``view="full"``) or the crop (``"crop"``)."""

    def load(source: str | Path, *, seed: int = 0) -> list[EvalItem]:
        rows, base = read_rows(source, (".parquet",))
        items = []
        for row in rows:
            require_columns(row, ("id", "query", "response", "image", "crop_image"), "ZoomBench")
            query, truth = str(row["query"]), str(row["response"]).strip()
            options = [m.group(2).strip() for m in _OPTION.finditer(query)]
            is_choice = bool(re.fullmatch(r"\(?[A-H]\)?\.?", truth))
            full = image_source(row["image"], base, row["_where"])
            crop = image_source(row["crop_image"], base, row["_where"])
            dimension = next((row[c] for c in _DIMENSION_COLUMNS if row.get(c)), None)
            items.append(
                EvalItem(
                    benchmark=name,
                    id=str(row["id"]),
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
        return items

    return load


def score(graded: list[GradedItem]) -> dict:
    """Overall and per dimension."""
    overall = accuracy(graded)
    return {"overall": overall["accuracy"], **overall, "dimensions": by_group(graded, lambda g: g.item.category)}
