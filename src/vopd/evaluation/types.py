"""Plain data types shared by the evaluation modules: what is asked, and what came back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from vopd.images import ImageSource, load_image

__all__ = ["AnswerKind", "EvalItem", "GradedItem", "ItemList", "PromptItem", "Status"]

#: How an item is graded: an option letter, a yes/no word, POPE's own yes/no parse, or free text.
AnswerKind = Literal["choice", "yesno", "pope", "open"]

#: What happened to an item: graded by a rule or the judge; graded wrong because no answer
#: could be read from the reply; no reply (the request failed after its retries); the judge
#: failed or answered out of format.
Status = Literal["graded", "unparsed", "failed", "judge_failed"]


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
        id: the item's id as the benchmark file gives it (``index``, ``question_id``, ...).
        source: the file or configuration the item was read from, relative to the path given
            (e.g. ``"hr_bench_4k"``, ``"test_2d"``, ``"direct_attributes"``); with ``id`` it makes
            :attr:`key`, so ids repeated across files cannot collide.
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
    source: str = ""

    @property
    def key(self) -> str:
        """Unique within the benchmark: ``source/id`` (or ``id`` when there is no source)."""
        return f"{self.source}/{self.id}" if self.source else str(self.id)

    def open_image(self) -> Image.Image:
        """Return the image as RGB, with an error that names the benchmark and item."""
        return load_image(self.image, where=f"{self.benchmark} item {self.id}")


@dataclass
class GradedItem:
    """An item with its prediction and verdict.

    ``correct`` is ``None`` when the item could not be judged (``status`` ``"failed"``: no
    prediction; ``"judge_failed"``: the judge failed or answered out of format). Headline
    scores count such items as wrong, as the official scripts count a missing answer; the
    judged-only accuracy beside it leaves them out.
    """

    item: EvalItem
    prediction: str | None
    correct: bool | None
    method: str
    extracted: str | None = None
    status: Status = "graded"


class ItemList(list):
    """A loader's items plus ``files`` (each file or configuration read, with its item count) and
    ``notes`` (what was skipped and why), so the summary says exactly what was evaluated."""

    def __init__(self, items: Any = (), *, files: dict[str, int] | None = None, notes: list[str] | None = None):
        super().__init__(items)
        self.files: dict[str, int] = dict(files or {})
        self.notes: list[str] = list(notes or [])
