"""MMVP (300 questions in 150 pairs): held-out check for forgetting.

Format: a folder with ``Questions.csv`` (``Index, Question, Options, Correct Answer``, options
written ``(a) Open (b) Closed``) and ``MMVP Images/<Index>.jpg``. Rows 1-2, 3-4, ... are pairs
(two images that look alike but differ). The official metric is pair accuracy: a pair counts
only if both of its questions are right. Per-question accuracy is reported too.
"""

from __future__ import annotations

import re
from pathlib import Path

from vopd.evaluation.benchmarks.files import (
    DEFAULT_PROMPT,
    BenchmarkFormatError,
    check_prompt,
    choice_prompt,
    letter,
    read_file,
    require_columns,
)
from vopd.evaluation.metrics import accuracy, pair_accuracy
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

NAME = "mmvp"
#: ``paper``: the question, ``(A) ...`` lines, "Answer with the option's letter ...". One only.
PROMPTS = ("paper",)
_OPTION = re.compile(r"\(([a-h])\)\s*(.*?)\s*(?=\([a-h]\)|$)", re.IGNORECASE | re.DOTALL)


def load(
    source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
) -> ItemList:
    """Load ``Questions.csv`` (or a folder holding it) and the images beside it."""
    check_prompt(NAME, prompt, PROMPTS)
    path = Path(source)
    csv_path = path if path.is_file() else path / "Questions.csv"
    if not csv_path.is_file():
        raise BenchmarkFormatError(f"{path}: Questions.csv not found")
    image_dir = Path(image_root) if image_root else csv_path.parent / "MMVP Images"
    items = []
    for n, row in enumerate(read_file(csv_path)):
        row["_where"] = f"{csv_path}:{n + 2}"
        require_columns(row, ("Index", "Question", "Options", "Correct Answer"), "MMVP")
        index = int(row["Index"])
        options = [m.group(2).strip() for m in _OPTION.finditer(row["Options"])]
        image = next(
            (image_dir / f"{index}{e}" for e in (".jpg", ".png", ".jpeg") if (image_dir / f"{index}{e}").is_file()),
            None,
        )
        if image is None:
            raise BenchmarkFormatError(f"{row['_where']}: image {image_dir}/{index}.jpg not found")
        items.append(
            EvalItem(
                benchmark=NAME,
                id=str(index),
                image=image,
                prompt=choice_prompt(row["Question"], options),
                answer=letter(row["Correct Answer"]),
                options=options,
                question=row["Question"],
                meta={"pair": (index - 1) // 2},
            )
        )
    return ItemList(items, files={csv_path.name: len(items)})


def score(graded: list[GradedItem]) -> dict:
    """Pair accuracy (``overall``, the official metric) and per-question accuracy."""
    pairs = pair_accuracy(graded, lambda g: g.item.meta["pair"])
    questions = accuracy(graded)
    return {
        "overall": pairs["accuracy"],
        "judged_overall": pairs["judged_accuracy"],
        "pairs": pairs,
        "questions": questions,
        "n": questions["n"],
        "judged": questions["judged"],
        "unjudged": questions["unjudged"],
    }
