"""Tiny benchmark files in the layouts their publishers ship (test support, not a library module).

Written from the published schemas, not from vopd's loaders:

- HR-Bench (``DreamMr/HR-Bench``): ``hr_bench_4k`` and ``hr_bench_8k``, each as ``.tsv`` and
  ``.parquet`` side by side; columns ``index, question, A, B, C, D, answer, category,
  cycle_category, image`` (base64 text). The paper's ``eval/prepare_data.py`` reads the parquet.
- MME-RealWorld in lmms-eval form (``yifanzhang114/MME-RealWorld-Lmms-eval`` and the CN / lite
  variants): ``data/*.parquet`` shards with ``index, question, multi-choice options`` (a list of
  ``"(A) ..."``), ``answer, category`` (``"Perception/Monitoring"``), ``l2-category`` and
  ``bytes`` (the image as base64 text), as lmms-eval's ``mme_realworld/utils.py`` reads them.
- V* (``craigwu/vstar_bench``): ``direct_attributes/`` and ``relative_position/`` with
  ``<name>.jpg`` + ``<name>.json`` (``target_object, bbox [x, y, w, h], question, options``,
  correct option first), and beside them ``GPT4V-hard/`` (``N.JPG``) and ``OCR/`` in the same
  JSON form, which are not V*Bench's 191 questions.
- ZoomBench (``inclusionAI/ZoomBench``): ``data/test.parquet`` with ``id, query, response,
  image, crop_image`` (image structs; ``crop_image`` may be null).
- POPE original: ``coco_pope_{adversarial,popular,random}.json``, JSON *lines* with
  ``question_id, image`` (a COCO file name), ``text, label``; lmms-eval's ``lmms-lab/POPE``:
  ``data/test-0000k-of-0000n.parquet`` (default configuration: ``question_id, question,
  answer, image, category``) and a ``Full/<split>/0000.parquet`` configuration beside it.
- MMStar (``Lin-Chen/MMStar``): ``mmstar.parquet`` (``index, question`` with ``Options: A: ...``,
  ``image, answer, category, l2_category``), and VLMEvalKit's ``MMStar.tsv`` of the same table.
- CV-Bench (``nyu-visionx/CV-Bench``): ``test_2d`` and ``test_3d``, each ``.parquet`` and
  ``.jsonl`` (JSONL images are paths under ``img/``), ``idx`` restarting in each file; columns
  ``idx, type, task, image, prompt, choices, answer`` (``"(A)"``), ``source``.

Images are solid colours: :func:`colour_oracle` answers by the colour it sees, so the tests
know every answer the "model" gives and compute each official number by hand.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 200, 20),
    "white": (255, 255, 255),
}


def png(colour: str, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def jpg(colour: str, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def b64(colour: str) -> str:
    return base64.b64encode(png(colour)).decode("ascii")


def seen_colour(image: Image.Image) -> str:
    r, g, b = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    return min(COLOURS, key=lambda c: sum((x - y) ** 2 for x, y in zip(COLOURS[c], (r, g, b))))


def colour_oracle(image: Image.Image, prompt: str) -> str:
    """A "model" that names the option whose text is the image's colour, else answers by rules:

    - options written ``(A) red`` or ``A. red`` on lines, ``A: red`` after "Options:", or
      ``（A）red``: the letter of the option naming the colour, else ``"Z"`` (no option: wrong);
    - "Is there a <colour> ...?": "Yes, there is." if it is the colour, else "There is no <x>."
      (both as POPE's script reads them);
    - otherwise the colour's name.
    """
    colour = seen_colour(image)
    options = re.findall(r"^\s*[\(（]?([A-H])[\)）\.:]\s*(\w+)", prompt, re.MULTILINE)
    options += re.findall(r"\b([A-H]):\s*(\w+)", prompt.split("Options:", 1)[1]) if "Options:" in prompt else []
    if prompt.lower().startswith("is there"):
        return "Yes, there is." if colour in prompt.lower() else f"There is no {prompt.split()[3]} in the image."
    if options:
        return next((f"{letter}" for letter, word in options if word.lower() == colour), "Z")
    return colour


def _parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _tsv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def hrbench_rows(spec: list[tuple[str, str, list[str]]]) -> list[dict[str, Any]]:
    """``spec``: per question (category, image colour, options A-D with the truth first); each
    question becomes 4 rows, the options rotated, ``cycle_category`` naming the rotation."""
    rows = []
    for q, (category, colour, options) in enumerate(spec):
        for r in range(4):
            opts = options[r:] + options[:r]
            rows.append(
                {
                    "index": len(rows),
                    "question": f"What colour is thing {q}?",
                    "A": opts[0],
                    "B": opts[1],
                    "C": opts[2],
                    "D": opts[3],
                    "answer": "ABCD"[opts.index(options[0])],
                    "category": category,
                    "cycle_category": f"cycle{r}",
                    "image": b64(colour),
                }
            )
    return rows


def write_hrbench_snapshot(root: Path, spec_4k: list, spec_8k: list) -> Path:
    for res, spec in (("4k", spec_4k), ("8k", spec_8k)):
        rows = hrbench_rows(spec)
        _tsv(rows, root / f"hr_bench_{res}.tsv")
        _parquet(rows, root / f"hr_bench_{res}.parquet")
    return root


def mmerw_rows(spec: list[tuple[str, str, list[str], str]], *, full_width: bool = False) -> list[dict[str, Any]]:
    """``spec``: (category "Task/Subtask", image colour, five options, answer letter)."""
    rows = []
    for i, (category, colour, options, answer) in enumerate(spec):
        prefix = "（{}）" if full_width else "({}) "
        rows.append(
            {
                "index": 1000 + i,
                "question": f"Which colour is shown in picture {i}?",
                "multi-choice options": [prefix.format("ABCDE"[k]) + o for k, o in enumerate(options)],
                "answer": answer,
                "category": category,
                "l2-category": "color/attribute",
                "bytes": b64(colour),
            }
        )
    return rows


def write_mmerw_lmms(root: Path, rows: list[dict[str, Any]], shards: int = 2) -> Path:
    per = -(-len(rows) // shards)
    for k in range(shards):
        _parquet(rows[k * per : (k + 1) * per], root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet")
    (root / "README.md").write_text("---\nconfigs: [default]\n---\n")
    return root


def write_vstar_snapshot(root: Path, spec: dict[str, list[tuple[str, list[str]]]]) -> Path:
    """``spec``: folder -> [(image colour, options with the correct one first)]. ``GPT4V-hard``
    images are ``N.JPG`` as published."""
    for folder, questions in spec.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n, (colour, options) in enumerate(questions):
            stem = str(n) if folder in ("GPT4V-hard", "OCR") else f"sa_{n}"
            ext = ".JPG" if folder == "GPT4V-hard" else ".jpg"
            (root / folder / f"{stem}{ext}").write_bytes(jpg(colour))
            (root / folder / f"{stem}.json").write_text(
                json.dumps(
                    {
                        "target_object": ["thing"],
                        "bbox": [[2, 2, 8, 8]],
                        "question": "What is the colour of the thing?",
                        "options": options,
                    }
                )
            )
    (root / "README.md").write_text("V* Bench")
    return root


def write_zoombench(root: Path, spec: list[tuple[str, str | None, str]]) -> Path:
    """``spec``: (image colour, crop colour or None, truth letter); options red/green/blue/yellow."""
    rows = []
    for i, (colour, crop, truth) in enumerate(spec):
        rows.append(
            {
                "id": f"zb_{i}",
                "query": "What colour?\n(A) red\n(B) green\n(C) blue\n(D) yellow",
                "response": truth,
                "image": {"bytes": png(colour), "path": f"{i}.png"},
                "crop_image": None if crop is None else {"bytes": png(crop), "path": f"{i}_crop.png"},
            }
        )
    return _parquet(rows, root / "data" / "test.parquet")


def write_pope_original(root: Path, spec: dict[str, list[tuple[str, str, str]]], image_dir: Path) -> Path:
    """``spec``: split -> [(image colour, asked colour, label)]; JSON lines in ``coco_pope_<split>.json``,
    images named like COCO's in ``image_dir``."""
    root.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    qid = 1
    for split, rows in spec.items():
        lines = []
        for colour, asked, label in rows:
            name = f"COCO_val2014_{qid:012d}.jpg"
            (image_dir / name).write_bytes(jpg(colour))
            lines.append(
                json.dumps(
                    {
                        "question_id": qid,
                        "image": name,
                        "text": f"Is there a {asked} thing in the image?",
                        "label": label,
                    }
                )
            )
            qid += 1
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return root


def write_pope_lmms(root: Path, spec: list[tuple[str, str, str, str]]) -> Path:
    """``spec``: (split, image colour, asked colour, answer); default config in ``data/``, a
    ``Full/`` configuration (other rows) beside it."""
    rows = [
        {
            "id": str(i),
            "question_id": str(i + 1),
            "question": f"Is there a {asked} thing in the image?",
            "answer": ans,
            "image_source": f"COCO_val2014_{i}",
            "image": {"bytes": png(colour), "path": None},
            "category": split,
        }
        for i, (split, colour, asked, ans) in enumerate(spec)
    ]
    _parquet(rows, root / "data" / "test-00000-of-00001.parquet")
    for split in ("adversarial", "popular", "random"):
        extra = [dict(r, question_id=str(900 + k)) for k, r in enumerate(rows)]
        _parquet(extra, root / "Full" / split / "0000.parquet")
    return root


def write_mmstar_snapshot(root: Path, spec: list[tuple[str, list[str], str]]) -> Path:
    """``spec``: (image colour, options A-D, answer letter); the same table as parquet and TSV."""
    rows = []
    for i, (colour, options, answer) in enumerate(spec):
        question = "What colour is it?\nOptions: " + ", ".join(f"{'ABCD'[k]}: {o}" for k, o in enumerate(options))
        rows.append(
            {
                "index": i,
                "question": question,
                "image": {"bytes": png(colour), "path": None},
                "answer": answer,
                "category": "fine-grained perception",
                "l2_category": "color",
                "meta_info": {"source": "synthetic"},
            }
        )
    _parquet(rows, root / "mmstar.parquet")
    tsv = [
        {
            "index": r["index"],
            "question": r["question"],
            "answer": r["answer"],
            "category": r["category"],
            "l2_category": r["l2_category"],
            "image": b64(spec[i][0]),
        }
        for i, r in enumerate(rows)
    ]
    _tsv(tsv, root / "MMStar.tsv")
    return root


def write_cvbench_snapshot(root: Path, spec_2d: list[tuple[str, str, str]], spec_3d: list[tuple[str, str]]) -> Path:
    """``spec_2d``: (source ADE20K/COCO, image colour, truth option text); ``spec_3d``: (colour,
    truth). Options red/green/blue; ``idx`` restarts at 0 in each file, as published."""
    options = ["red", "green", "blue"]
    for name, kind, spec in (("test_2d", "2D", spec_2d), ("test_3d", "3D", [("Omni3D", c, t) for c, t in spec_3d])):
        parquet_rows, json_rows = [], []
        for idx, (source, colour, truth) in enumerate(spec):
            rel = f"img/{kind}/count/{source.lower()}_{idx}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png(colour))
            row = {
                "idx": idx,
                "type": kind,
                "task": "Count" if kind == "2D" else "Depth",
                "prompt": "What colour is it? Select from the following choices.\n"
                + "\n".join(f"({'ABC'[k]}) {o}" for k, o in enumerate(options)),
                "choices": options,
                "answer": f"({'ABC'[options.index(truth)]})",
                "source": source,
                "filename": rel,
            }
            parquet_rows.append(dict(row, image={"bytes": png(colour), "path": rel}))
            json_rows.append(dict(row, image=rel))
        _parquet(parquet_rows, root / f"{name}.parquet")
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in json_rows) + "\n")
    return root
