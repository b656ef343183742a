"""POPE (object hallucination, yes/no; adversarial / popular / random splits).

Layouts:
- the original files ``coco_pope_{adversarial,popular,random}.json``: JSON *lines* despite the
  suffix, ``question_id, image, text, label``, with ``image`` a COCO file name (relative to
  the file's folder, or to ``image_root``: the COCO ``val2014/`` folder). A folder is searched
  for ``*pope*.json``/``.jsonl``; a single file works too;
- the lmms-eval parquet (``lmms-lab/POPE``): ``question_id, question, answer, image,
  category``. Its snapshot holds the default configuration in ``data/`` (what lmms-eval
  evaluates) and a ``Full/`` configuration beside it; a folder with both reads ``data/`` only.

Replies are read as POPE's own script reads them (a reply without "no"/"not" is a yes). Scores
(POPE's ``evaluate.py``): accuracy, precision, recall, F1 and the yes-ratio of the
*predictions*, overall and per split. ``overall`` is the F1.
"""

from __future__ import annotations

from pathlib import Path

from vopd.evaluation.benchmarks.files import (
    DEFAULT_PROMPT,
    BenchmarkFormatError,
    check_prompt,
    image_source,
    read_rows,
    rows_base,
)
from vopd.evaluation.metrics import pope_metrics
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

NAME = "pope"
#: ``paper``: the question, then "Answer the question using a single word or phrase."
#: (lmms-eval's and LLaVA's POPE prompt); ``plain``: the question alone (POPE's original).
PROMPTS = ("paper", "plain")
INSTRUCTION = "Answer the question using a single word or phrase."


def _include(root: Path):
    default_and_full = (root / "data").is_dir() and (root / "Full").is_dir()

    def keep(rel: Path) -> bool:
        if default_and_full and rel.parts[0] == "Full":
            return False
        return rel.suffix.lower() == ".parquet" or "pope" in rel.name.lower()

    return keep


def load(
    source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
) -> ItemList:
    check_prompt(NAME, prompt, PROMPTS)
    path = Path(str(source))
    include = _include(path) if path.is_dir() else None
    rows = read_rows(
        source,
        (".parquet", ".jsonl", ".json"),
        include=include,
        why_excluded="only the default configuration data/ and *pope* JSON files are POPE",
    )
    items = []
    for n, row in enumerate(rows):
        question = row.get("question", row.get("text"))
        answer = row.get("answer", row.get("label"))
        if question is None or answer is None or "image" not in row:
            raise BenchmarkFormatError(
                f"{row['_where']}: POPE rows need image + question/text + answer/label; "
                f"found {sorted(k for k in row if not k.startswith('_'))}"
            )
        answer = str(answer).strip().lower()
        if answer not in ("yes", "no"):
            raise BenchmarkFormatError(f"{row['_where']}: answer must be yes or no, got {answer!r}")
        split = row.get("category") or Path(row["_source"]).name.replace("coco_pope_", "")
        qid = row.get("question_id")
        items.append(
            EvalItem(
                benchmark=NAME,
                id=f"{split}/{qid if qid not in (None, '') else n}",
                source=row["_source"],
                image=image_source(row["image"], rows_base(row, image_root), row["_where"]),
                prompt=f"{question}\n{INSTRUCTION}" if prompt == "paper" else str(question),
                answer=answer,
                kind="pope",
                category=split,
                question=str(question),
            )
        )
    return ItemList(items, files=rows.files, notes=rows.notes)


def score(graded: list[GradedItem]) -> dict:
    overall = pope_metrics(graded)
    splits = {}
    for name in sorted({g.item.category for g in graded if g.item.category}):
        splits[name] = pope_metrics([g for g in graded if g.item.category == name])
    return {"overall": overall["f1"], "judged_overall": overall["judged_f1"], **overall, "splits": splits}
