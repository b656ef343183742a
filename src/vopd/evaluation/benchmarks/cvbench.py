"""CV-Bench (2D: counting and relations on ADE20K / COCO; 3D: depth and distance on Omni3D).

Published as ``nyu-visionx/CV-Bench``: ``test_2d`` and ``test_3d``, each as parquet and JSONL
(older snapshots: one ``test``), with ``idx, type, task, image, prompt, choices, answer,
source``; ``answer`` like ``(A)``, ``prompt`` holding the question and options; JSONL images
are paths under ``img/``. A folder reads each table once (parquet first); ``idx`` restarts in
every file, so items are keyed by file and ``idx``. Official score (the CV-Bench card):
2D = mean of the ADE20K and COCO accuracies, 3D = Omni3D accuracy, overall = mean of 2D and 3D.
"""

from __future__ import annotations

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

NAME = "cvbench"
#: ``paper``: the published ``prompt`` (question and options), then "Answer with the option's
#: letter from the given choices directly." One template only.
PROMPTS = ("paper",)


def _include(root: Path):
    split = any(root.glob("test_2d.*")) or any(root.glob("test_3d.*"))
    return lambda rel: not (split and Path(rel).name.lower().startswith("test."))


def load(
    source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
) -> ItemList:
    check_prompt(NAME, prompt, PROMPTS)
    path = Path(str(source))
    rows = read_rows(
        source,
        (".parquet", ".jsonl"),
        include=_include(path) if path.is_dir() else None,
        why_excluded="the combined test table of an older release, beside test_2d/test_3d",
    )
    items = []
    for n, row in enumerate(rows):
        require_columns(row, ("type", "image", "prompt", "choices", "answer"), "CV-Bench")
        items.append(
            EvalItem(
                benchmark=NAME,
                id=str(row.get("idx", n)),
                source=row["_source"],
                image=image_source(row["image"], rows_base(row, image_root), row["_where"]),
                prompt=f"{row['prompt']}\n{CHOICE_INSTRUCTION}",
                answer=letter(row["answer"]),
                options=[str(c) for c in row["choices"]],
                category=str(row["type"]).upper(),
                question=str(row.get("question", row["prompt"])),
                meta={"source": row.get("source"), "task": row.get("task")},
            )
        )
    return ItemList(items, files=rows.files, notes=rows.notes)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def score(graded: list[GradedItem]) -> dict:
    """2D (mean over its sources), 3D, their mean, and per task."""
    two_d = [g for g in graded if g.item.category == "2D"]
    sources = by_group(two_d, lambda g: g.item.meta.get("source"))
    acc_2d = _mean([v["accuracy"] for v in sources.values()]) if sources else accuracy(two_d)["accuracy"]
    acc_3d = accuracy([g for g in graded if g.item.category == "3D"])["accuracy"]
    judged_2d = (
        _mean([v["judged_accuracy"] for v in sources.values()]) if sources else accuracy(two_d)["judged_accuracy"]
    )
    judged_3d = accuracy([g for g in graded if g.item.category == "3D"])["judged_accuracy"]
    pooled = accuracy(graded)
    return {
        "overall": _mean([acc_2d, acc_3d]),
        "judged_overall": _mean([judged_2d, judged_3d]),
        "2D": acc_2d,
        "3D": acc_3d,
        "sources": by_group(graded, lambda g: g.item.meta.get("source")),
        "tasks": by_group(graded, lambda g: g.item.meta.get("task")),
        "n": pooled["n"],
        "unjudged": pooled["unjudged"],
    }
