"""V* Bench (191 questions: direct attributes 115, relative position 76).

Two layouts:
- the parquet mirror: ``image`` (bytes), ``text`` (question with ``(A) ...`` options and the
  instruction), ``label`` (the letter), ``category``, optionally ``question_id``;
- the original folders ``direct_attributes/`` and ``relative_position/``, each image next to a
  JSON with ``target_object``, ``bbox`` (``[x, y, w, h]`` per object), ``question`` and
  ``options`` whose *first* entry is correct; options are shuffled with a fixed seed per item
  so the answer letter is not always A. The boxes make this layout usable by ``vopd gap``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from vopd.evaluation.benchmarks._io import (
    CHOICE_INSTRUCTION,
    BenchmarkFormatError,
    choice_prompt,
    image_source,
    letter,
    read_rows,
    require_columns,
)
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem

NAME = "vstar"
_OPTION_LINE = re.compile(r"^\s*\(([A-H])\)\s*(.*)$")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def load(source: str | Path, *, seed: int = 0) -> list[EvalItem]:
    """Load either layout (a folder of JSON + images, or parquet files / a hub id)."""
    path = Path(str(source))
    if path.is_dir() and not any(path.rglob("*.parquet")):
        return _load_original(path, seed)
    rows, base = read_rows(source, (".parquet",))
    return [_from_parquet_row(n, row, base) for n, row in enumerate(rows)]


def _from_parquet_row(n: int, row: dict, base: Path) -> EvalItem:
    require_columns(row, ("image", "text", "label"), "V* parquet")
    text = str(row["text"]).strip()
    lines = text.splitlines()
    options = [m.group(2).strip() for line in lines if (m := _OPTION_LINE.match(line))]
    question = next((line for line in lines if line.strip()), "")
    prompt = text if "answer with" in text.lower() else f"{text}\n{CHOICE_INSTRUCTION}"
    return EvalItem(
        benchmark=NAME,
        id=str(row.get("question_id", n)),
        image=image_source(row["image"], base, row["_where"]),
        prompt=prompt,
        answer=letter(row["label"]),
        options=options,
        category=row.get("category"),
        question=question,
    )


def _load_original(root: Path, seed: int) -> list[EvalItem]:
    items = []
    for meta_path in sorted(root.rglob("*.json")):
        where = str(meta_path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BenchmarkFormatError(f"{where}: invalid JSON ({err})") from err
        if not isinstance(meta, dict) or "options" not in meta:
            continue  # e.g. a stray config file
        meta["_where"] = where
        require_columns(meta, ("question", "options"), "V* original")
        image = next((meta_path.with_suffix(e) for e in _IMAGE_EXTS if meta_path.with_suffix(e).is_file()), None)
        if image is None:
            raise BenchmarkFormatError(f"{where}: no image next to it (looked for {meta_path.stem}.jpg/.png)")
        item_id = f"{meta_path.parent.name}/{meta_path.stem}"
        correct = meta["options"][0]
        options = list(meta["options"])
        random.Random(f"{seed}:{item_id}").shuffle(options)  # independent of file order
        boxes = [[x, y, x + w, y + h] for x, y, w, h in meta.get("bbox", [])]
        items.append(
            EvalItem(
                benchmark=NAME,
                id=item_id,
                image=image,
                prompt=choice_prompt(meta["question"], options),
                answer="ABCDEFGH"[options.index(correct)],
                options=options,
                category=meta_path.parent.name,
                question=meta["question"],
                meta={"boxes_xyxy": boxes, "target_object": meta.get("target_object")},
            )
        )
    if not items:
        raise BenchmarkFormatError(f"{root}: no V* JSON files with 'options' found")
    return items


def score(graded: list[GradedItem]) -> dict:
    """Overall accuracy and per category (direct_attributes, relative_position)."""
    overall = accuracy(graded)
    return {"overall": overall["accuracy"], **overall, "categories": by_group(graded, lambda g: g.item.category)}
