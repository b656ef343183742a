"""V* Bench (191 questions: direct attributes 115, relative position 76).

Two layouts:
- the lmms-eval parquet (``lmms-lab/vstar-bench``, ``data/test-00000-of-00001.parquet``; the
  paper's source): ``image`` (bytes), ``text`` (question with ``(A) ...`` options),
  ``label`` (the letter), ``category``, ``question_id``;
- the original snapshot (``craigwu/vstar_bench``): folders ``direct_attributes/`` (115) and
  ``relative_position/`` (76), each image next to a JSON with ``target_object``, ``bbox``
  (``[x, y, w, h]`` per object), ``question`` and ``options`` whose *first* entry is correct;
  options are shuffled with a fixed seed per item so the answer letter is not always A. The
  snapshot's other folders (``GPT4V-hard/``, ``OCR/``) are not part of V*Bench's 191 and are
  not read. The boxes make this layout usable by ``vopd gap``.

Official score: accuracy over the 191 questions (per category beside it).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from vopd.evaluation.benchmarks.files import (
    CHOICE_INSTRUCTION,
    DEFAULT_PROMPT,
    BenchmarkFormatError,
    check_prompt,
    choice_prompt,
    image_source,
    letter,
    read_rows,
    require_columns,
    rows_base,
)
from vopd.evaluation.metrics import accuracy, by_group
from vopd.evaluation.types import EvalItem, GradedItem, ItemList

NAME = "vstar"
#: ``paper``: the question text as published, then "Answer with the option's letter from the
#: given choices directly." (the paper's and lmms-eval's prompt). One template only.
PROMPTS = ("paper",)
SUBSETS = ("direct_attributes", "relative_position")
_OPTION_LINE = re.compile(r"^\s*\(([A-H])\)\s*(.*)$")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".JPG", ".JPEG", ".PNG")


def load(
    source: str | Path, *, seed: int = 0, prompt: str = DEFAULT_PROMPT, image_root: str | Path | None = None
) -> ItemList:
    """Load either layout (a folder of JSON + images, or parquet files / a hub id)."""
    check_prompt(NAME, prompt, PROMPTS)
    path = Path(str(source))
    if path.is_dir() and not any(path.rglob("*.parquet")):
        return _load_original(path, seed)
    rows = read_rows(source, (".parquet",))
    items = [_from_parquet_row(n, row, rows_base(row, image_root)) for n, row in enumerate(rows)]
    notes = list(rows.notes)
    if path.is_dir():  # both layouts in one folder: the parquet is read, the original JSON + images are not
        original = sorted({p.parent.relative_to(path).as_posix() or "." for p in path.rglob("*.json")})
        if original:
            notes.append(
                "not read (the original layout; this folder's parquet was read instead, one layout per run): "
                + ", ".join(f"{o}/" for o in original)
            )
    return ItemList(items, files=rows.files, notes=notes)


def _from_parquet_row(n: int, row: dict, base: Path) -> EvalItem:
    require_columns(row, ("image", "text", "label"), "V* parquet")
    text = str(row["text"]).strip()
    lines = text.splitlines()
    options = [m.group(2).strip() for line in lines if (m := _OPTION_LINE.match(line))]
    question = next((line for line in lines if line.strip()), "")
    prompt = text if text.endswith(CHOICE_INSTRUCTION) else f"{text}\n{CHOICE_INSTRUCTION}"
    qid = row.get("question_id")
    return EvalItem(
        benchmark=NAME,
        id=str(qid if qid not in (None, "") else n),
        source=row["_source"],
        image=image_source(row["image"], base, row["_where"]),
        prompt=prompt,
        answer=letter(row["label"]),
        options=options,
        category=row.get("category"),
        question=question,
    )


def _load_original(root: Path, seed: int) -> ItemList:
    subsets = [root / s for s in SUBSETS if (root / s).is_dir()]
    notes = []
    if subsets:  # the snapshot: read V*Bench's two folders only
        others = sorted(
            p.name for p in root.iterdir() if p.is_dir() and p not in subsets and not p.name.startswith(".")
        )
        if others:
            notes.append(f"not read (not part of V*Bench's 191 questions): {', '.join(o + '/' for o in others)}")
        meta_paths = sorted(p for d in subsets for p in d.rglob("*.json"))
    else:  # one subset folder given directly, or a flat folder
        meta_paths = sorted(root.rglob("*.json"))
    items = []
    files: dict[str, int] = {}
    for meta_path in meta_paths:
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
        item_id = f"{meta_path.parent.name}/{meta_path.stem}"  # the option-shuffle seed
        correct = meta["options"][0]
        options = list(meta["options"])
        random.Random(f"{seed}:{item_id}").shuffle(options)  # independent of file order
        boxes = [[x, y, x + w, y + h] for x, y, w, h in meta.get("bbox", [])]
        items.append(
            EvalItem(
                benchmark=NAME,
                id=meta_path.stem,
                source=meta_path.parent.name,
                image=image,
                prompt=choice_prompt(meta["question"], options),
                answer="ABCDEFGH"[options.index(correct)],
                options=options,
                category=meta_path.parent.name,
                question=meta["question"],
                meta={"boxes_xyxy": boxes, "target_object": meta.get("target_object")},
            )
        )
        files[f"{meta_path.parent.name}/"] = files.get(f"{meta_path.parent.name}/", 0) + 1
    if not items:
        raise BenchmarkFormatError(f"{root}: no V* JSON files with 'options' found")
    return ItemList(items, files=files, notes=notes)


def score(graded: list[GradedItem]) -> dict:
    """Overall accuracy and per category (direct_attributes, relative_position)."""
    overall = accuracy(graded)
    return {
        "overall": overall["accuracy"],
        "judged_overall": overall["judged_accuracy"],
        **overall,
        "categories": by_group(graded, lambda g: g.item.category),
    }
