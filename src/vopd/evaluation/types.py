"""Plain data types shared by the evaluation modules: what is asked, and what came back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from vopd.images import ImageSource, load_image

__all__ = ["AnswerKind", "EvalItem", "GradedItem", "PromptItem"]

#: How an item is graded: an option letter, a yes/no word, or a free-form answer.
AnswerKind = Literal["choice", "yesno", "open"]


@dataclass
class PromptItem:
    """One generation request: an image, the full prompt text, and an id to match the answer."""

    id: str
    image: Image.Image
    text: str


@dataclass
class EvalItem:
    """One benchmark question, already in a common shape.

    Attributes:
        benchmark: registry name, e.g. ``"vstar"`` or ``"hrbench_4k"``.
        id: unique within the benchmark (rotations and views get their own suffix).
        image: a path, encoded bytes, ``data:`` URL or PIL image; opened on demand so that a
            benchmark with tens of thousands of rows does not hold every image in memory.
        prompt: the complete text sent to the model (question, options, instruction).
        answer: the ground truth: an option letter (``"B"``), ``"yes"``/``"no"`` or free text.
        kind: how the answer is graded.
        options: option texts in letter order (``options[0]`` is A); empty for open answers.
        category: the benchmark's own category name, used for per-category scores.
        question: the bare question (for the judge and for reports).
        meta: benchmark-specific fields the metric needs (rotation, pair, level, crop, boxes).
    """

    benchmark: str
    id: str
    image: ImageSource
    prompt: str
    answer: str
    kind: AnswerKind = "choice"
    options: list[str] = field(default_factory=list)
    category: str | None = None
    question: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def open_image(self) -> Image.Image:
        """Return the image as RGB, with an error that names the benchmark and item."""
        return load_image(self.image, where=f"{self.benchmark} item {self.id}")


@dataclass
class GradedItem:
    """An item with its prediction and verdict.

    ``correct`` is ``None`` when the item could not be judged (no prediction, or the judge
    failed or answered out of format): such items are counted separately, never as wrong.
    """

    item: EvalItem
    prediction: str | None
    correct: bool | None
    method: str
    extracted: str | None = None
