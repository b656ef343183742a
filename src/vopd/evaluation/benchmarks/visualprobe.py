"""VisualProbe Easy / Medium / Hard: open answers on high-resolution images.

Format: ``val.json``, a list of ``{images: [path], problem, solution}``. Pass one ``val.json``
or a folder holding ``easy/``, ``medium/``, ``hard/`` (the level is the folder name). Answers
are open: rules settle exact matches, a judge the rest. Score: per level and their mean.
"""

from __future__ import annotations

import re
from pathlib import Path

from vopd.evaluation.benchmarks.files import (
    DEFAULT_PROMPT,
    BenchmarkFormatError,
    check_prompt,
    image_source,
    read_file,
    require_columns,
)
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

NAME = "visualprobe"
#: ``paper``: the problem, then "Answer the question using a single word or phrase." One only.
PROMPTS = ("paper",)
LEVELS = ("easy", "medium", "hard")
INSTRUCTION = "Answer the question using a single word or phrase."


def _level(path: Path) -> str:
    for part in reversed(path.parts[:-1]):
        for level in LEVELS:
            if level in part.lower():
                return level
    return "all"


def load(
    source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
) -> ItemList:
    """Load one ``val.json`` or every ``val.json`` under a folder."""
    check_prompt(NAME, prompt, PROMPTS)
    path = Path(source)
    files = [path] if path.is_file() else sorted(path.rglob("val.json"))
    if not files:
        raise BenchmarkFormatError(f"{path}: no val.json found (expected easy/, medium/, hard/ folders)")
    items = []
    counts: dict[str, int] = {}
    for file in files:
        before = len(items)
        level = _level(file)
        for n, row in enumerate(read_file(file)):
            row["_where"] = f"{file}:{n}"
            require_columns(row, ("images", "problem", "solution"), "VisualProbe")
            problem = re.sub(r"<image>\s*", "", str(row["problem"])).strip()
            solution = re.sub(r"</?answer>", "", str(row["solution"])).strip()
            items.append(
                EvalItem(
                    benchmark=NAME,
                    id=str(row.get("id", n)),
                    source=level if level != "all" else file.parent.name,
                    image=image_source(row["images"], Path(image_root) if image_root else file.parent, row["_where"]),
                    prompt=f"{problem}\n{INSTRUCTION}",
                    answer=solution,
                    kind="open",
                    category=level,
                    question=problem,
                )
            )
        counts[file.name if file == path else file.relative_to(path).as_posix()] = len(items) - before
    return ItemList(items, files=counts)


def score(graded: list[GradedItem]) -> dict:
    """Per level and the mean over levels (``overall``)."""
    levels = by_group(graded, lambda g: g.item.category)
    values = [v["accuracy"] for v in levels.values() if v["accuracy"] is not None]
    pooled = accuracy(graded)
    judged = [v["judged_accuracy"] for v in levels.values() if v["judged_accuracy"] is not None]
    return {
        "overall": sum(values) / len(values) if values else None,
        "judged_overall": sum(judged) / len(judged) if judged else None,
        "levels": levels,
        "pooled_accuracy": pooled["accuracy"],
        "n": pooled["n"],
        "unjudged": pooled["unjudged"],
    }
