"""MME-RealWorld EN / CN / Lite: five options (A-E), perception and reasoning tasks.

Two layouts:
- the lmms-eval parquet (``yifanzhang114/MME-RealWorld-Lmms-eval``, ``...-CN-Lmms-eval``,
  ``...-lite-lmms-eval``; the paper's own source): ``data/*.parquet`` shards with ``index,
  question, multi-choice options`` (``"(A) ..."`` strings), ``answer, category`` (``"Perception/
  Monitoring"``: task/subtask), ``l2-category`` (the fine category) and ``bytes`` (the image,
  base64 text);
- the original JSON: a list of ``{Question_id, Image, Text, Answer choices, Ground truth, Task,
  Subtask, Category}`` with ``Image`` relative to the JSON's folder (or to ``image_root``).

Official score (lmms-eval ``mme_realworld_aggregate_results``): micro accuracy over all items;
perception / reasoning, per subtask and per category beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vopd.evaluation.benchmarks.files import (
    DEFAULT_PROMPT,
    BenchmarkFormatError,
    check_prompt,
    image_source,
    letter,
    read_rows,
    rows_base,
    strip_option_prefix,
)
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

#: ``paper``: the paper's eval prompt, the same as lmms-eval's (question, a space, "The choices
#: are listed below:", the options as published, "... The best answer is: "); ``lines``: the
#: question and the choices on lines of their own.
PROMPTS = ("paper", "lines")

_PAPER = {
    "en": (
        "{question} The choices are listed below:\n{options}\n"
        "Select the best answer to the above multiple-choice question based on the image. "
        "Respond with only the letter (A, B, C, D, or E) of the correct option.\nThe best answer is: "
    ),
    "cn": (
        "{question} 选项如下所示:\n{options}\n"
        "根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为： "
    ),
}

_LINES = {
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
    "Image": ("Image", "image", "bytes"),
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
            f"{row.get('_where', '?')}: MME-RealWorld rows need '{field}' (or {_ALIASES[field][1:]}); found {present}"
        )
    return None


def make_load(name: str, lang: str):
    """A loader for split ``name`` with the English or Chinese prompt."""

    def load(
        source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
    ) -> ItemList:
        check_prompt(name, prompt, PROMPTS)
        rows = read_rows(source, (".parquet", ".json"))
        items = []
        for n, row in enumerate(rows):
            raw_options = _get(row, "Answer choices")
            if isinstance(raw_options, str) or not hasattr(raw_options, "__iter__"):
                raise BenchmarkFormatError(f"{row['_where']}: 'multi-choice options' must be a list of options")
            published = [str(o).strip() for o in raw_options if str(o).strip()]
            options = [strip_option_prefix(o) for o in published]
            question = str(_get(row, "Text")).strip()
            task = str(_get(row, "Task", False) or "")
            subtask = _get(row, "Subtask", False)
            if "/" in task and subtask is None:  # lmms-eval: "Perception/Remote Sensing"
                task, subtask = task.split("/", 1)
            if prompt == "paper":
                text = _PAPER[lang].format(question=question, options="\n".join(published))
            else:
                listed = "\n".join(f"({'ABCDE'[i]}) {o}" for i, o in enumerate(options))
                text = _LINES[lang].format(question=question, options=listed)
            qid = _get(row, "Question_id", False)
            items.append(
                EvalItem(
                    benchmark=name,
                    id=str(qid if qid not in (None, "") else n),
                    source=row["_source"],
                    image=image_source(_get(row, "Image"), rows_base(row, image_root), row["_where"]),
                    prompt=text,
                    answer=letter(_get(row, "Ground truth")),
                    options=options,
                    category=_get(row, "Category", False),
                    question=question,
                    # the published choices ("(A) ...") are what the official scorer reads
                    meta={"task": task.strip().lower() or None, "subtask": subtask, "choices": published},
                )
            )
        return ItemList(items, files=rows.files, notes=rows.notes)

    return load


def score(graded: list[GradedItem]) -> dict:
    """Overall, perception / reasoning, per subtask and per category."""
    overall = accuracy(graded)
    return {
        "overall": overall["accuracy"],
        "judged_overall": overall["judged_accuracy"],
        **overall,
        "tasks": by_group(graded, lambda g: g.item.meta.get("task")),
        "subtasks": by_group(graded, lambda g: g.item.meta.get("subtask")),
        "categories": by_group(graded, lambda g: g.item.category),
    }
