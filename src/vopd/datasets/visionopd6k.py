"""Read and write the released Vision-OPD-6K layout.

A data folder holds ``train.jsonl`` whose rows look like::

    {"problem": "<image>\\n<question>\\n\\n<HINT>\\n\\nA. ...\\nB. ...\\n\\n<INSTRUCTION>",
     "images": ["<full image with the red box drawn>"],
     "teacher_images": ["<crop around the box, zoomed 2x>"],
     "original_images": ["<clean full image>"],
     "bbox": [x1, y1, x2, y2], "answer": "B"}

with image paths relative to the folder. :func:`parse_visionopd6k_row` maps a row to a
:class:`~vopd.records.Sample` whose image is the *clean* original (the student view draws the
box itself when asked), whose question has the ``<image>`` placeholder, the hint, the options
and the instruction taken out (options go to ``Sample.options``), and whose ``teacher_image``
is the released crop. Importing this module registers the layout with
:func:`~vopd.records.load_records`, which then detects it on a file's first row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vopd.config import ViewConfig
from vopd.images import load_image
from vopd.jsonl import write_rows
from vopd.records import Box, RecordError, Sample, register_layout, resolve_record_path, safe_file_name
from vopd.views import HINT, INSTRUCTION, prompt_text, student_view, teacher_view

__all__ = [
    "IMAGE_PLACEHOLDER",
    "is_visionopd6k_row",
    "parse_problem",
    "parse_visionopd6k_row",
    "write_visionopd6k",
]

IMAGE_PLACEHOLDER = "<image>"
_REQUIRED = ("problem", "original_images", "bbox")
_KNOWN = (*_REQUIRED, "images", "teacher_images", "answer", "id")
_OPTION_LINE = re.compile(r"^([A-Z])\.\s(.*)$")


def is_visionopd6k_row(obj: Mapping[str, Any]) -> bool:
    """A row in the released layout: a ``problem`` text and image lists, no ``question``."""
    has_lists = any(k in obj for k in ("original_images", "teacher_images", "images"))
    return "problem" in obj and "question" not in obj and has_lists


def _tidy(text: str) -> str:
    """Strip line ends and collapse runs of blank lines into one."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parse_problem(problem: str) -> tuple[str, list[str] | None, bool]:
    """Split a ``problem`` text into ``(question, options, had_hint)``.

    The options are parsed only when re-rendering them with :func:`vopd.views.prompt_text`
    gives back exactly the tidied problem text (placeholder removed); otherwise ``options``
    is ``None`` and the question keeps the option lines and instruction as they are.
    """
    text = _tidy(problem.replace(IMAGE_PLACEHOLDER, ""))
    had_hint = HINT in text
    # Drop the hint with its line when it stands alone, so no extra blank line is left.
    plain = _tidy(
        "\n".join(
            line.replace(HINT, "").strip() if HINT in line else line
            for line in text.split("\n")
            if line.strip() != HINT
        )
    )
    parsed = _split_options(plain)
    if parsed is not None:
        question, options = parsed
        rendered = prompt_text(Sample(id="", image="", question=question, options=options), hint=had_hint)
        if rendered == text:
            return question, options, had_hint
    return plain, None, had_hint


def _split_options(text: str) -> tuple[str, list[str]] | None:
    """``(question, options)`` when ``text`` ends with A., B., ... lines and the instruction."""
    if not text.endswith(INSTRUCTION):
        return None
    lines = text[: -len(INSTRUCTION)].rstrip().split("\n")
    found: list[tuple[str, str]] = []  # (letter, option), collected bottom-up
    while lines and (m := _OPTION_LINE.match(lines[-1])):
        found.insert(0, (m.group(1), m.group(2)))
        lines.pop()
        if m.group(1) == "A":
            break
    if len(found) < 2 or [f[0] for f in found] != [chr(ord("A") + i) for i in range(len(found))]:
        return None
    options = [f[1] for f in found]
    question = "\n".join(lines).strip()
    return (question, options) if question else None


def _one_path(obj: Mapping[str, Any], key: str, base: Path) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) != 1:
        raise RecordError("expected a list with exactly one image path", field=key)
    return resolve_record_path(value[0], base, f"{key}[0]")


def parse_visionopd6k_row(obj: Mapping[str, Any], base: Path, *, row: int, stem: str = "train") -> Sample:
    """Map one released row to a :class:`Sample` (paths resolved against ``base``).

    Unknown keys are kept in ``meta`` (the release may carry extra columns); ``meta`` also
    keeps the raw ``problem``, whether it had the hint, and the boxed image path.
    """
    for key in _REQUIRED:
        if key not in obj:
            raise RecordError("missing required field of the Vision-OPD-6K layout", field=key)
    problem = obj["problem"]
    if not isinstance(problem, str) or not problem.strip():
        raise RecordError("must be a non-empty string", field="problem")
    try:
        box = Box.from_format(obj["bbox"], "xyxy")
    except RecordError as err:
        raise RecordError(err.reason, field="bbox") from None
    question, options, had_hint = parse_problem(problem)
    answer = obj.get("answer")
    meta: dict[str, Any] = {k: v for k, v in obj.items() if k not in _KNOWN}
    meta.update(problem=problem, hint_in_problem=had_hint)
    boxed = _one_path(obj, "images", base)
    if boxed is not None:
        meta["boxed_image"] = boxed
    return Sample(
        id=str(obj["id"]) if obj.get("id") is not None else f"{stem}-{row}",
        image=_one_path(obj, "original_images", base),
        question=question,
        options=options,
        answer=None if answer is None else str(answer).strip(),
        boxes=[box],
        teacher_image=_one_path(obj, "teacher_images", base),
        meta=meta,
    )


def write_visionopd6k(
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    cfg: ViewConfig | None = None,
    file_name: str = "train.jsonl",
) -> Path:
    """Write samples in the released layout, e.g. to train with code written for it.

    For each sample this saves, as PNG under ``out_dir``: ``original_images/<id>.png`` (the
    clean image), ``images/<id>.png`` (the student view with the box drawn) and
    ``teacher_images/<id>.png`` (the teacher crop), built with ``cfg`` (default: the
    release's look, ``ViewConfig(context=0, min_side=1, zoom=2, draw_box=True, box_width=5)``).
    ``problem`` is ``<image>`` + newline + the prompt text with the hint. Several boxes are
    written as their union (the layout holds one ``bbox``). Returns the JSONL path.
    """
    cfg = cfg or ViewConfig(context=0.0, min_side=1, zoom=2.0, draw_box=True, box_width=5)
    out_dir = Path(out_dir)
    rows = []
    used: set[str] = set()
    for sample in samples:
        if not sample.boxes:
            raise RecordError(f"sample {sample.id!r}: the layout needs an evidence box", field="boxes")
        name = safe_file_name(sample.id)
        while name in used:
            name += "_"
        used.add(name)
        clean = load_image(sample.image, where=f"sample {sample.id!r}")
        box = Box.union(sample.boxes)
        paths = {}
        for folder, image in (
            ("original_images", clean),
            ("images", student_view(clean, [box], cfg)),
            ("teacher_images", teacher_view(clean, [box], cfg)),
        ):
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
            image.save(out_dir / folder / f"{name}.png", format="PNG")
            paths[folder] = [f"{folder}/{name}.png"]
        rows.append(
            {
                "id": sample.id,
                "problem": f"{IMAGE_PLACEHOLDER}\n" + prompt_text(sample, hint=True),
                **paths,
                "bbox": box.as_list(),
                "answer": sample.answer,
            }
        )
    return write_rows(rows, out_dir / file_name)


register_layout("visionopd6k", is_visionopd6k_row, parse_visionopd6k_row)
