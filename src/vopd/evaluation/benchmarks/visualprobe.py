"""VisualProbe Easy / Medium / Hard: open answers on high-resolution images.

Format: ``val.json``, a list of ``{images: [path], problem, solution}``. Pass one ``val.json``
or a folder holding ``easy/``, ``medium/``, ``hard/`` (the level is the folder name). Answers
are open: rules settle exact matches, a judge the rest. Score: per level and their mean.
"""

from __future__ import annotations

import re
from pathlib import Path

from vopd.evaluation.benchmarks._io import BenchmarkFormatError, image_source, read_file, require_columns
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem

NAME = "visualprobe"
LEVELS = ("easy", "medium", "hard")
INSTRUCTION = "Answer the question using a single word or phrase."


def _level(path: Path) -> str:
    for part in reversed(path.parts[:-1]):
        for level in LEVELS:
            if level in part.lower():
                return level
    return "all"


def load(source: str | Path, *, seed: int = 0) -> list[EvalItem]:
    """Load one ``val.json`` or every ``val.json`` under a folder."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(path.rglob("val.json"))
    if not files:
        raise BenchmarkFormatError(f"{path}: no val.json found (expected easy/, medium/, hard/ folders)")
    items = []
    for file in files:
        level = _level(file)
        for n, row in enumerate(read_file(file)):
            row["_where"] = f"{file}:{n}"
            require_columns(row, ("images", "problem", "solution"), "VisualProbe")
            problem = re.sub(r"<image>\s*", "", str(row["problem"])).strip()
            solution = re.sub(r"</?answer>", "", str(row["solution"])).strip()
            items.append(
                EvalItem(
                    benchmark=NAME,
                    id=f"{level}/{row.get('id', n)}",
                    image=image_source(row["images"], file.parent, row["_where"]),
                    prompt=f"{problem}\n{INSTRUCTION}",
                    answer=solution,
                    kind="open",
                    category=level,
                    question=problem,
                )
            )
    return items


def score(graded: list[GradedItem]) -> dict:
    """Per level and the mean over levels (``overall``)."""
    levels = by_group(graded, lambda g: g.item.category)
    values = [v["accuracy"] for v in levels.values() if v["accuracy"] is not None]
    pooled = accuracy(graded)
    return {
        "overall": sum(values) / len(values) if values else None,
        "levels": levels,
        "pooled_accuracy": pooled["accuracy"],
        "n": pooled["n"],
        "unjudged": pooled["unjudged"],
    }
