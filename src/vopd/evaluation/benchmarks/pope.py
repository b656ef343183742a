"""POPE (object hallucination, yes/no; adversarial / popular / random splits).

Formats: the lmms-eval parquet (``question_id, question, answer, image, category``) or the
original JSONL (``question_id, image, text, label``, with ``image`` a file name relative to the
JSONL's folder or ``image_root``). Scores: accuracy, precision, recall, F1 and the yes-ratio
of the *predictions*, overall and per split. ``overall`` is the F1.
"""

from __future__ import annotations

from pathlib import Path

from vopd.evaluation.benchmarks._io import BenchmarkFormatError, image_source, read_rows
from vopd.evaluation.metrics import pope_metrics
from vopd.evaluation.types import EvalItem, GradedItem

NAME = "pope"
INSTRUCTION = "Answer the question using a single word or phrase."


def load(source: str | Path, *, seed: int = 0, image_root: str | Path | None = None) -> list[EvalItem]:
    rows, base = read_rows(source, (".parquet", ".jsonl"))
    base = Path(image_root) if image_root else base
    items = []
    for n, row in enumerate(rows):
        question = row.get("question", row.get("text"))
        answer = row.get("answer", row.get("label"))
        if question is None or answer is None or "image" not in row:
            raise BenchmarkFormatError(
                f"{row['_where']}: POPE rows need image + question/text + answer/label; found {sorted(row)}"
            )
        answer = str(answer).strip().lower()
        if answer not in ("yes", "no"):
            raise BenchmarkFormatError(f"{row['_where']}: answer must be yes or no, got {answer!r}")
        split = row.get("category") or Path(row["_where"].rsplit(":", 1)[0]).stem.replace("coco_pope_", "")
        items.append(
            EvalItem(
                benchmark=NAME,
                id=f"{split}/{row.get('question_id', n)}",
                image=image_source(row["image"], base, row["_where"]),
                prompt=f"{question}\n{INSTRUCTION}",
                answer=answer,
                kind="yesno",
                category=split,
                question=str(question),
            )
        )
    return items


def score(graded: list[GradedItem]) -> dict:
    overall = pope_metrics(graded)
    splits = {}
    for name in sorted({g.item.category for g in graded if g.item.category}):
        splits[name] = pope_metrics([g for g in graded if g.item.category == name])
    return {"overall": overall["f1"], **overall, "splits": splits}
