"""MME-RealWorld EN / CN / Lite: five options (A-E), perception and reasoning tasks.

Two layouts:
- the original JSON: a list of ``{Question_id, Image, Text, Answer choices, Ground truth, Task,
  Subtask, Category}`` with ``Image`` relative to the JSON's folder (or to ``image_root``);
- the lmms-eval parquet: ``question_id, image, question, multi-choice options, answer,
  category, l2-category`` where ``category`` is the task (perception / reasoning, possibly
  with a ``/subtask`` suffix) and ``l2-category`` the fine category.

Scores: overall, perception and reasoning, per subtask and per category.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vopd.evaluation.benchmarks._io import (
    BenchmarkFormatError,
    image_source,
    letter,
    read_rows,
    strip_option_prefix,
)
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem

_TEMPLATES = {
    "en": (
        "{question}\nThe choices are listed below:\n{options}\n"
        "Select the best answer to the above multiple-choice question based on the image. "
        "Respond with only the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:"
    ),
    "cn": (
        "{question}\n选项如下所示:\n{options}\n"
        "请根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为："
    ),
}

# Column names in the original JSON -> lmms-eval parquet alternatives.
_ALIASES = {
    "Question_id": ("Question_id", "question_id", "index"),
    "Image": ("Image", "image"),
    "Text": ("Text", "question"),
    "Answer choices": ("Answer choices", "multi-choice options", "options"),
    "Ground truth": ("Ground truth", "answer"),
    "Task": ("Task", "category"),
    "Subtask": ("Subtask", "subtask"),
    "Category": ("Category", "l2-category", "l2_category"),
}


def _get(row: dict[str, Any], field: str, required: bool = True) -> Any:
    for name in _ALIASES[field]:
        if name in row:
            return row[name]
    if required:
        present = sorted(k for k in row if not k.startswith("_"))
        raise BenchmarkFormatError(
            f"{row.get('_where', '?')}: MME-RealWorld rows need '{field}' (or {_ALIASES[field][1:]}); "
            f"found {present}"
        )
    return None


def make_load(name: str, lang: str):
    """A loader for split ``name`` with the English or Chinese prompt."""

    def load(source: str | Path, *, seed: int = 0, image_root: str | Path | None = None) -> list[EvalItem]:
        rows, base = read_rows(source, (".json", ".parquet"))
        base = Path(image_root) if image_root else base
        items = []
        for n, row in enumerate(rows):
            options = [strip_option_prefix(o) for o in _get(row, "Answer choices")]
            question = str(_get(row, "Text"))
            task = str(_get(row, "Task", False) or "")
            subtask = _get(row, "Subtask", False)
            if "/" in task and subtask is None:  # lmms-eval: "Perception/Remote Sensing"
                task, subtask = task.split("/", 1)
            listed = "\n".join(f"({'ABCDE'[i]}) {o}" for i, o in enumerate(options))
            items.append(
                EvalItem(
                    benchmark=name,
                    id=str(_get(row, "Question_id", False) or n),
                    image=image_source(_get(row, "Image"), base, row["_where"]),
                    prompt=_TEMPLATES[lang].format(question=question, options=listed),
                    answer=letter(_get(row, "Ground truth")),
                    options=options,
                    category=_get(row, "Category", False),
                    question=question,
                    meta={"task": task.strip().lower() or None, "subtask": subtask},
                )
            )
        return items

    return load


def score(graded: list[GradedItem]) -> dict:
    """Overall, perception / reasoning, per subtask and per category."""
    overall = accuracy(graded)
    return {
        "overall": overall["accuracy"],
        **overall,
        "tasks": by_group(graded, lambda g: g.item.meta.get("task")),
        "subtasks": by_group(graded, lambda g: g.item.meta.get("subtask")),
        "categories": by_group(graded, lambda g: g.item.category),
    }
