"""HR-Bench 4K / 8K: 200 questions, each asked in 4 option rotations (800 rows).

Published as ``DreamMr/HR-Bench``: ``hr_bench_4k`` and ``hr_bench_8k``, each as TSV and as
parquet, side by side. Columns ``index, question, A, B, C, D, answer, category,
cycle_category, image`` (base64 text). ``category`` is ``single`` (FSP, fine-grained
single-instance perception) or ``cross`` (FCP, cross-instance perception); ``cycle_category``
names the rotation. ``hrbench_4k`` reads only the files named ``*4k*`` of a folder (``8k``
likewise), parquet before TSV (the same table is never read twice).

Official score (HR-Bench's eval, as VLMEvalKit runs it): the accuracy of each rotation, averaged
over rotations, overall and for single and cross.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from vopd.evaluation.benchmarks.files import (
    DEFAULT_PROMPT,
    check_prompt,
    choice_prompt,
    image_source,
    letter,
    read_rows,
    require_columns,
    rows_base,
)
from vopd.evaluation.metrics import accuracy, outcome_counts, rotation_mean
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

GROUP_NAMES = {"single": "FSP", "cross": "FCP"}

#: ``paper``: the Vision-OPD eval prompt (question, " Select from the following choices.", then
#: ``(A) ...`` lines); ``letters``: ``A. ...`` lines and "Answer with the option's letter ...".
PROMPTS = ("paper", "letters")


def _prompt(question: str, options: list[str], template: str) -> str:
    if template == "paper":
        lines = [f"({'ABCD'[i]}) {o}" for i, o in enumerate(options)]
        return f"{question.strip()} Select from the following choices.\n" + "\n".join(lines)
    return choice_prompt(question, options, style="dot")


def make_load(name: str):
    """A loader that tags items with benchmark ``name`` (``hrbench_4k`` or ``hrbench_8k``)."""
    resolution = name.rsplit("_", 1)[-1].lower()  # "4k" / "8k"

    def load(
        source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
    ) -> ItemList:
        check_prompt(name, prompt, PROMPTS)
        rows = read_rows(
            source,
            (".parquet", ".tsv"),
            include=lambda p: resolution in p.name.lower(),
            why_excluded=f"{name} reads the files named *{resolution}*",
        )
        seen: dict[tuple, int] = defaultdict(int)
        inferred = 0
        items = []
        for row in rows:
            require_columns(row, ("index", "question", "A", "B", "answer", "image"), "HR-Bench")
            options = [str(row[k]).strip() for k in "ABCD" if row.get(k) not in (None, "", "nan")]
            # Without cycle_category, the n-th row with the same question, option set and image
            # is that question's n-th rotation.
            rotation = row.get("cycle_category")
            if rotation in (None, ""):
                question_key = (row["_source"], str(row["question"]), frozenset(options), _fingerprint(row["image"]))
                rotation = seen[question_key]
                seen[question_key] += 1
                inferred += 1
            items.append(
                EvalItem(
                    benchmark=name,
                    id=str(row["index"]),
                    source=row["_source"],
                    image=image_source(row["image"], rows_base(row, image_root), row["_where"]),
                    prompt=_prompt(str(row["question"]), options, prompt),
                    answer=letter(row["answer"]),
                    options=options,
                    category=row.get("category"),
                    question=str(row["question"]),
                    meta={"rotation": str(rotation)},
                )
            )
        notes = list(rows.notes)
        if inferred:
            notes.append(f"{inferred} rows without cycle_category: rotation inferred from repeated question + image")
        return ItemList(items, files=rows.files, notes=notes)

    return load


def _fingerprint(image: object) -> int:
    """A cheap identity of an image cell (base64 text, bytes or a parquet struct)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    return hash(image if isinstance(image, (str, bytes)) else repr(image))


def score(graded: list[GradedItem]) -> dict:
    """Mean over rotations, overall and per category; also the pooled accuracy."""
    rot = rotation_mean(graded, lambda g: g.item.meta["rotation"], lambda g: g.item.category)
    groups = {f"{GROUP_NAMES.get(k, k)} ({k})": v for k, v in rot["groups"].items()}
    pooled = accuracy(graded)
    return {
        "overall": rot["overall"],
        "judged_overall": rot["judged_overall"],
        "groups": groups,
        "per_rotation": rot["per_rotation"],
        "pooled_accuracy": pooled["accuracy"],
        "n": pooled["n"],
        "judged": pooled["judged"],
        "unjudged": pooled["unjudged"],
        **outcome_counts(graded),
    }
