"""Tiny synthetic benchmarks in each published schema, plus an "oracle" that answers them (test support).

For tests, CI and trying ``vopd eval`` / ``vopd gap`` without downloading anything. Every
image is white with one coloured square at a known box; every question asks its colour. Half
the squares are large (visible in the full image), half small (visible only when zoomed), so a
model that needs a minimum number of coloured pixels shows a regional-to-global gap.

:func:`oracle_answer` is such a model: it reads the colour only when the square covers at least
``min_fraction`` of the image, and otherwise answers the first option. It backs the fake server
in tests (see :class:`support.fake_server.FakeChatServer`).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["COLOURS", "FORMATS", "draw_scene", "oracle_answer", "write_synthetic"]

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220), "yellow": (230, 200, 20)}
NAMES = list(COLOURS)
SIZE = 128


def draw_scene(colour: str, small: bool, rng: random.Random) -> tuple[Image.Image, list[int]]:
    """A white image with one square; returns the image and the square's ``[x1, y1, x2, y2]``."""
    side = 8 if small else 40
    x, y = rng.randrange(4, SIZE - side - 4), rng.randrange(4, SIZE - side - 4)
    arr = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    arr[y : y + side, x : x + side] = COLOURS[colour]
    return Image.fromarray(arr), [x, y, x + side, y + side]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _seen_colour(image: Image.Image, min_fraction: float) -> str | None:
    arr = np.asarray(image.convert("RGB")).astype(int)
    best, best_share = None, 0.0
    for name, rgb in COLOURS.items():
        share = float(np.mean(np.all(np.abs(arr - np.array(rgb)) < 40, axis=-1)))
        if share > best_share:
            best, best_share = name, share
    return best if best_share >= min_fraction else None


def oracle_answer(image: Image.Image, prompt: str, *, min_fraction: float = 0.01) -> str:
    """Answer a synthetic question as a model that misses squares below ``min_fraction``."""
    colour = _seen_colour(image, min_fraction)
    text = prompt.lower()
    if text.startswith("is there") or " yes or no" in text:
        asked = next((c for c in NAMES if c in text), None)
        return "Yes." if colour is not None and colour == asked else "No."
    options = re.findall(r"^\s*\(?([a-h])[\.\):]\s*(\w+)", prompt, re.IGNORECASE | re.MULTILINE)
    if not options:  # MMStar style "Options: A: red, B: green"
        options = re.findall(r"\b([A-H]):\s*(\w+)", prompt)
    if options:
        for letter, word in options:
            if word.lower() == colour:
                return f"The answer is ({letter.upper()})."
        return options[0][0].upper()
    return colour or "I cannot tell"


def _items(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        colour = NAMES[rng.randrange(4)]
        image, box = draw_scene(colour, small=i % 2 == 1, rng=rng)
        options = NAMES[:]
        rng.shuffle(options)
        items.append(
            {
                "i": i,
                "colour": colour,
                "image": image,
                "box": box,
                "options": options,
                "letter": "ABCD"[options.index(colour)],
            }
        )
    return items


QUESTION = "What is the colour of the square?"


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _options_text(options: list[str]) -> str:
    return "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(options))


def _vstar_parquet(root: Path, items: list[dict[str, Any]]) -> Path:
    rows = [
        {
            "question_id": it["i"],
            "image": {"bytes": _png(it["image"]), "path": None},
            "text": f"{QUESTION}\n{_options_text(it['options'])}\n"
            "Answer with the option's letter from the given choices directly.",
            "label": it["letter"],
            "category": "direct_attributes" if it["i"] % 3 else "relative_position",
        }
        for it in items
    ]
    return _write_parquet(rows, root / "test-00000-of-00001.parquet")


def _vstar_original(root: Path, items: list[dict[str, Any]]) -> Path:
    for it in items:
        folder = root / ("direct_attributes" if it["i"] % 3 else "relative_position")
        folder.mkdir(parents=True, exist_ok=True)
        it["image"].save(folder / f"sa_{it['i']}.png")
        x1, y1, x2, y2 = it["box"]
        opts = [it["colour"]] + [o for o in it["options"] if o != it["colour"]]  # correct first
        (folder / f"sa_{it['i']}.json").write_text(
            json.dumps(
                {
                    "target_object": ["square"],
                    "bbox": [[x1, y1, x2 - x1, y2 - y1]],
                    "question": QUESTION,
                    "options": opts,
                }
            )
        )
    return root


def _hrbench(root: Path, items: list[dict[str, Any]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "hr_bench_4k.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"])
        idx = 0
        for it in items:
            b64 = base64.b64encode(_png(it["image"])).decode()
            for r in range(4):  # four rotations of the options
                opts = it["options"][r:] + it["options"][:r]
                w.writerow(
                    [
                        idx,
                        QUESTION,
                        *opts,
                        "ABCD"[opts.index(it["colour"])],
                        "single" if it["i"] % 2 == 0 else "cross",
                        str(r),
                        b64,
                    ]
                )
                idx += 1
    return path


def _mmerw_json(root: Path, items: list[dict[str, Any]]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for it in items:
        it["image"].save(root / "images" / f"{it['i']}.png")
        opts = it["options"] + ["purple"]
        rows.append(
            {
                "Question_id": f"q{it['i']}",
                "Image": f"images/{it['i']}.png",
                "Text": QUESTION,
                "Answer choices": [f"({'ABCDE'[k]}) {o}" for k, o in enumerate(opts)],
                "Ground truth": it["letter"],
                "Task": "Perception" if it["i"] % 2 == 0 else "Reasoning",
                "Subtask": "Synthetic",
                "Category": "color",
            }
        )
    (root / "MME_RealWorld.json").write_text(json.dumps(rows))
    return root / "MME_RealWorld.json"


def _mmerw_parquet(root: Path, items: list[dict[str, Any]]) -> Path:
    rows = [
        {
            "question_id": f"q{it['i']}",
            "image": {"bytes": _png(it["image"]), "path": None},
            "question": QUESTION,
            "multi-choice options": [f"({'ABCDE'[k]}) {o}" for k, o in enumerate(it["options"] + ["purple"])],
            "answer": it["letter"],
            "category": "Perception" if it["i"] % 2 == 0 else "Reasoning",
            "l2-category": "color",
        }
        for it in items
    ]
    return _write_parquet(rows, root / "data.parquet")


def _zoombench(root: Path, items: list[dict[str, Any]]) -> Path:
    rows = []
    for it in items:
        x1, y1, x2, y2 = it["box"]
        crop = it["image"].crop((max(0, x1 - 8), max(0, y1 - 8), min(SIZE, x2 + 8), min(SIZE, y2 + 8)))
        rows.append(
            {
                "id": f"z{it['i']}",
                "query": f"{QUESTION}\n{_options_text(it['options'])}",
                "response": it["letter"],
                "image": {"bytes": _png(it["image"]), "path": None},
                "crop_image": {"bytes": _png(crop), "path": None},
                "dimension": "colour" if it["i"] % 2 == 0 else "attribute",
            }
        )
    return _write_parquet(rows, root / "zoombench.parquet")


def _visualprobe(root: Path, items: list[dict[str, Any]]) -> Path:
    for level_i, level in enumerate(("easy", "medium", "hard")):
        folder = root / level
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for it in items[level_i::3]:
            it["image"].save(folder / "images" / f"{it['i']}.png")
            rows.append(
                {
                    "images": [f"images/{it['i']}.png"],
                    "problem": f"<image>{QUESTION}",
                    "solution": f"<answer>{it['colour']}</answer>",
                }
            )
        (folder / "val.json").write_text(json.dumps(rows))
    return root


def _mmvp(root: Path, items: list[dict[str, Any]]) -> Path:
    (root / "MMVP Images").mkdir(parents=True, exist_ok=True)
    with (root / "Questions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        for it in items:
            index = it["i"] + 1
            it["image"].save(root / "MMVP Images" / f"{index}.jpg", quality=95)
            pair = it["options"][:2] if it["colour"] in it["options"][:2] else [it["colour"], it["options"][0]]
            w.writerow([index, QUESTION, f"(a) {pair[0]} (b) {pair[1]}", "(a)" if pair[0] == it["colour"] else "(b)"])
    return root


def _cvbench(root: Path, items: list[dict[str, Any]]) -> Path:
    sources = ["ADE20K", "COCO", "Omni3D"]
    rows = [
        {
            "idx": it["i"],
            "type": "3D" if sources[it["i"] % 3] == "Omni3D" else "2D",
            "task": "Count",
            "image": {"bytes": _png(it["image"]), "path": None},
            "prompt": f"{QUESTION} Select from the following choices.\n{_options_text(it['options'])}",
            "choices": it["options"],
            "answer": f"({it['letter']})",
            "source": sources[it["i"] % 3],
        }
        for it in items
    ]
    return _write_parquet(rows, root / "test.parquet")


def _mmstar(root: Path, items: list[dict[str, Any]]) -> Path:
    rows = [
        {
            "index": it["i"],
            "image": {"bytes": _png(it["image"]), "path": None},
            "question": f"{QUESTION}\nOptions: " + ", ".join(f"{'ABCD'[k]}: {o}" for k, o in enumerate(it["options"])),
            "answer": it["letter"],
            "category": "fine-grained perception",
            "l2_category": "color",
        }
        for it in items
    ]
    return _write_parquet(rows, root / "mmstar.parquet")


def _pope(root: Path, items: list[dict[str, Any]]) -> Path:
    rows = []
    for it in items:
        asked = it["colour"] if it["i"] % 2 == 0 else next(c for c in NAMES if c != it["colour"])
        rows.append(
            {
                "question_id": str(it["i"]),
                "question": f"Is there a {asked} square in the image?",
                "answer": "yes" if asked == it["colour"] else "no",
                "image": {"bytes": _png(it["image"]), "path": None},
                "category": ("adversarial", "popular", "random")[it["i"] % 3],
            }
        )
    return _write_parquet(rows, root / "pope.parquet")


def _records(root: Path, items: list[dict[str, Any]]) -> Path:
    """Our own record format (``vopd.records``): clean image, question, options, answer, boxes."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for it in items:
        it["image"].save(root / "images" / f"{it['i']}.png")
        lines.append(
            json.dumps(
                {
                    "id": f"s{it['i']}",
                    "image": f"images/{it['i']}.png",
                    "question": QUESTION,
                    "options": it["options"],
                    "answer": it["letter"],
                    "boxes": [it["box"]],
                    "category": "large" if it["i"] % 2 == 0 else "small",
                }
            )
        )
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


FORMATS = {
    "records": _records,
    "vstar": _vstar_parquet,
    "vstar_original": _vstar_original,
    "hrbench_4k": _hrbench,
    "hrbench_8k": _hrbench,
    "mme_rw_en": _mmerw_json,
    "mme_rw_cn": _mmerw_parquet,
    "mme_rw_lite": _mmerw_parquet,
    "zoombench": _zoombench,
    "zoombench_crop": _zoombench,
    "visualprobe": _visualprobe,
    "mmvp": _mmvp,
    "cvbench": _cvbench,
    "mmstar": _mmstar,
    "pope": _pope,
}


def write_synthetic(fmt: str, root: str | Path, *, n: int = 6, seed: int = 0) -> Path:
    """Write ``n`` synthetic questions in benchmark format ``fmt`` under ``root``; return the path to load.

    ``fmt`` is a benchmark name, ``vstar_original`` for V*'s folder layout (the loader is
    ``vstar`` for both), or ``records`` for a :func:`vopd.records.load_records` file with boxes.
    Item ``i`` has a large square when ``i`` is even, a small one when odd.
    """
    if fmt not in FORMATS:
        raise KeyError(f"unknown synthetic format {fmt!r}; choose from {sorted(FORMATS)}")
    return FORMATS[fmt](Path(root), _items(n, seed))
