"""Training data pipeline: samples -> (student view, teacher view, text) -> prompt batches.

Views (crops, red boxes) and processor calls run inside data-loader workers (``data.num_workers``),
never serially in the training step. The order of prompts is a pure function of (seed, step), so a
resumed run sees exactly the prompts an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from vopd.config import ViewConfig
from vopd.datasets import load_records  # every registered layout (our JSONL, Vision-OPD-6K)
from vopd.images import ImageError, load_image
from vopd.models import build_prompts, chat_prompt
from vopd.records import RecordError, Sample
from vopd.specs import data_spec_loader
from vopd.views import make_views, prompt_text, reference_text, replay_draw, student_view


@dataclass
class PromptPair:
    """One micro-batch of prompts: the same questions under the student and the teacher view."""

    student: Any  # BatchFeature, left-padded, one row per prompt
    teacher: Any
    sample_ids: list[str]
    skipped: list[str] = field(default_factory=list)  # "file:row: reason" of rows replaced (on_error=skip)
    error: str = ""  # with defer_errors: why this batch could not be built (the consumer raises it)
    answers: list[str | None] | None = None  # reference answers, only when the dataset carries them (sft_gold)


class ViewItem(NamedTuple):
    """One prompt's views; ``skipped`` lists rows that failed to load and were replaced by this one."""

    id: str
    student: Image.Image
    teacher: Image.Image
    text: str
    origin: str = ""  # file:row of the sample
    skipped: tuple[str, ...] = ()
    error: str = ""  # with defer_errors: why this row cannot be used (no images then)
    teacher_text: str = ""  # the teacher's own prompt text (OPSD: + the reference answer); "" = ``text``
    answer: str | None = None  # the reference answer, only when the dataset carries answers


def load_train_samples(spec: str, *, out_of_bounds: str = "clip", on_error: str = "raise") -> list[Sample]:
    """Load training samples from a JSONL path or folder, or from a registered data spec such as
    ``toyworld:N[:SEED[:WORLD]]`` (see :mod:`vopd.specs`)."""
    return load_train_data(spec, out_of_bounds=out_of_bounds, on_error=on_error)[0]


def load_train_data(
    spec: str,
    *,
    out_of_bounds: str = "clip",
    on_error: str = "raise",
) -> tuple[list[Sample], list[str]]:
    """`load_train_samples` plus where each sample came from (``file:row``, or ``SPEC#i``)."""
    load = data_spec_loader(spec)
    if load is not None:
        samples = load(spec)
        return samples, [f"{spec}#{i}" for i in range(len(samples))]
    if not spec:
        raise ValueError("data.train is empty: give a JSONL file (see docs/data.md) or toyworld:N")
    # check_images: read every image header now (no pixel decoding), so a missing or unreadable
    # file and a box outside its image are found before step 1, named by file:row, and skipped
    # with on_error=skip; without the sizes, out_of_bounds could neither clip-and-count nor reject.
    loaded = load_records(spec, out_of_bounds=out_of_bounds, on_error=on_error, check_images=True)
    if loaded.skipped or loaded.clipped:
        warnings.warn(loaded.report, stacklevel=2)  # skipped rows are counted and reported, never silent
    return list(loaded.samples), [f"{loaded.source}:{row}" for row in loaded.rows]


def drop_over_long_texts(
    processor: Any,
    samples: list[Sample],
    origins: list[str],
    *,
    max_prompt_tokens: int | None,
    hint: bool,
    thinking: bool | None,
    on_error: str = "raise",
) -> tuple[list[Sample], list[str]]:
    """Find, before step 1, the samples whose prompt TEXT alone (chat template included, each
    image counted as its placeholder only) is over ``max_prompt_tokens``: they can never fit.

    One tokenizer call over all texts (no image is opened). ``on_error="raise"`` names the first
    as ``file:row``; ``"skip"`` drops them with a warning listing them. Prompts that are too long
    only with their image tokens are caught when the batch is built, also naming ``file:row``.
    """
    if not max_prompt_tokens or not samples:
        return samples, origins
    texts = [chat_prompt(processor, prompt_text(s, hint=hint), thinking=thinking) for s in samples]
    tok = getattr(processor, "tokenizer", processor)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    bad = [i for i, n in enumerate(lengths) if n > max_prompt_tokens]
    if not bad:
        return samples, origins
    lines = [
        f"{origins[i]}: prompt text alone is {lengths[i]} tokens, over data.max_prompt_tokens={max_prompt_tokens}"
        for i in bad
    ]
    if on_error != "skip":
        raise RecordError(f"{lines[0]} ({len(bad)} such row(s)); shorten the question or raise the limit")
    warnings.warn(f"skipped {len(bad)} over-long row(s):\n  " + "\n  ".join(lines[:20]), stacklevel=2)
    keep = sorted(set(range(len(samples))) - set(bad))
    return [samples[i] for i in keep], [origins[i] for i in keep]


def require_answers(
    samples: list[Sample],
    origins: list[str],
    *,
    objective: str,
    on_error: str = "raise",
) -> tuple[list[Sample], list[str]]:
    """Before step 1: the objectives that read reference answers (``opsd``, ``sft_gold``) need one
    in every sample. ``on_error="raise"`` names the first row without one; ``"skip"`` drops such
    rows with a warning counting and listing them."""
    bad = [i for i, s in enumerate(samples) if s.answer is None or not str(s.answer).strip()]
    if not bad:
        return samples, origins
    why = f"no reference answer (objective={objective} reads the records' answers)"
    if on_error != "skip":
        raise RecordError(
            f'{why}; {len(bad)} of {len(samples)} row(s) lack one. Add an "answer" to every '
            "record, use data.on_error=skip to drop them, or use objective=opd or sft_self (no labels)",
            file=origins[bad[0]],
            field="answer",
        )
    warnings.warn(
        f"skipped {len(bad)} row(s) with {why}:\n  " + "\n  ".join(origins[i] for i in bad[:20]), stacklevel=2
    )
    dropped = set(bad)
    keep = [i for i in range(len(samples)) if i not in dropped]
    return [samples[i] for i in keep], [origins[i] for i in keep]


class ViewDataset(torch.utils.data.Dataset):
    """Item i -> :class:`ViewItem` (id, student image, teacher image, prompt text, origin, skipped).

    An image that fails to load or decode here (e.g. a truncated file whose header read fine
    when the records were checked) raises naming ``file:row``, or with ``on_error="skip"`` the
    item is replaced by the next loadable sample (deterministic, so resumes stay exact) and the
    failed row is reported in ``skipped``. ``defer_errors`` returns the error in the item instead
    of raising, for data-loader workers: their exceptions reach the main process wrapped in a
    worker traceback, while a returned message is raised there as it is (see `PairCollator`).

    ``teacher_sees`` is ``"crop"`` (Vision-OPD) or ``"full"`` (the student's image).
    ``reference_in_teacher`` gives the teacher its own text, `vopd.views.reference_text` (OPSD);
    ``carry_answers`` puts each sample's reference answer in the item (SFT on gold answers). Both
    read ``sample.answer``; without them no answer leaves the dataset.
    """

    def __init__(
        self,
        samples: list[Sample],
        views: ViewConfig,
        *,
        teacher_sees: str = "crop",
        origins: list[str] | None = None,
        on_error: str = "raise",
        defer_errors: bool = False,
        reference_in_teacher: bool = False,
        carry_answers: bool = False,
    ):
        self.defer_errors = defer_errors
        self.reference_in_teacher = reference_in_teacher
        self.carry_answers = carry_answers
        self.samples = samples
        self.views = views
        self.teacher_sees = teacher_sees
        self.origins = origins if origins is not None else [f"sample {s.id!r}" for s in samples]
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.samples)

    def _views(self, sample: Sample) -> tuple[Image.Image, Image.Image, str]:
        if self.teacher_sees == "crop":
            student, teacher, text = make_views(sample, self.views)
            if self.views.student_crop_share > 0 and replay_draw(sample.id) < self.views.student_crop_share:
                student = teacher  # crop replay: the student reads the teacher's own view
            return student, teacher, text
        # Control: no privileged view. The teacher sees exactly what the student sees.
        image = load_image(sample.image, where=f"sample {sample.id}")
        student = student_view(image, sample.boxes, self.views)
        return student, student, prompt_text(sample, hint=self.views.hint)

    def __getitem__(self, i: int) -> ViewItem:
        skipped: list[str] = []
        for j in [*range(i, len(self.samples)), *range(i)]:
            sample = self.samples[j]
            try:
                student, teacher, text = self._views(sample)
                teacher_text = reference_text(sample, hint=self.views.hint) if self.reference_in_teacher else ""
            except (ImageError, RecordError, OSError, ValueError) as err:  # PIL's own decode errors too
                reason = err.reason if isinstance(err, RecordError) else str(err) or type(err).__name__
                if self.on_error != "skip":
                    return self._fail(
                        i,
                        RecordError(
                            f"{reason} (data.on_error=skip skips such rows)",
                            file=self.origins[j],
                            field=getattr(err, "field", None),
                        ),
                    )
                skipped.append(f"{self.origins[j]}: {reason}")
                continue
            answer = sample.answer if self.carry_answers else None
            return ViewItem(
                sample.id, student, teacher, text, self.origins[j], tuple(skipped), "", teacher_text, answer
            )
        return self._fail(i, RecordError(f"no sample of the {len(self.samples)} can be loaded; first: {skipped[0]}"))

    def _fail(self, i: int, err: RecordError) -> ViewItem:
        if not self.defer_errors:
            raise err
        return ViewItem(self.samples[i].id, None, None, "", self.origins[i], (), str(err))  # type: ignore[arg-type]


class PairCollator:
    """Turns view items into a :class:`PromptPair` with the model's processor."""

    def __init__(
        self, processor: Any, *, thinking: bool | None, max_prompt_tokens: int | None, defer_errors: bool = False
    ):
        self.processor = processor
        self.thinking = thinking
        self.max_prompt_tokens = max_prompt_tokens
        self.defer_errors = defer_errors  # return a PromptPair with .error instead of raising (workers)

    def __call__(self, items: list[ViewItem | tuple[str, Image.Image, Image.Image, str]]) -> PromptPair:
        ids = [it[0] for it in items]
        try:
            return self._collate(items, ids)
        except RecordError as err:
            if not self.defer_errors:
                raise
            return PromptPair(student=None, teacher=None, sample_ids=ids, error=str(err))

    def _collate(self, items: list, ids: list[str]) -> PromptPair:
        failed = next((it.error for it in items if getattr(it, "error", "")), "")
        if failed:
            raise RecordError(failed)
        texts = [it[3] for it in items]
        teacher_texts = [getattr(it, "teacher_text", "") or it[3] for it in items]  # OPSD: + the reference answer
        student = build_prompts(self.processor, [it[1] for it in items], texts, thinking=self.thinking)
        teacher = build_prompts(self.processor, [it[2] for it in items], teacher_texts, thinking=self.thinking)
        for batch in (student, teacher):
            self._check_lengths(batch, items)
        skipped = [s for it in items for s in getattr(it, "skipped", ())]
        answers = [getattr(it, "answer", None) for it in items]
        return PromptPair(
            student=student,
            teacher=teacher,
            sample_ids=ids,
            skipped=skipped,
            answers=answers if any(a is not None for a in answers) else None,
        )

    def _check_lengths(self, batch: Any, items: list) -> None:
        """Rows over ``max_prompt_tokens`` are an error naming the sample's ``file:row``."""
        if self.max_prompt_tokens is None:
            return
        for row, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            if n > self.max_prompt_tokens:
                where = getattr(items[row], "origin", "") or f"sample {items[row][0]!r}"
                raise RecordError(
                    f"prompt has {int(n)} tokens (image included), over data.max_prompt_tokens="
                    f"{self.max_prompt_tokens}; shrink the image (the processor's max_pixels) or the text, "
                    "or raise the limit",
                    file=where,
                )


class StepSampler(torch.utils.data.Sampler[list[int]]):
    """Yields micro-batches of indices; step s uses prompts [s*P, (s+1)*P) of a seeded per-epoch order.

    Each process takes its own shard of every step's prompts. ``start_step`` resumes exactly.
    """

    def __init__(
        self,
        num_items: int,
        *,
        prompts_per_step: int,
        micro_batch_prompts: int,
        seed: int,
        shuffle: bool = True,
        start_step: int = 0,
        num_steps: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_items == 0:
            raise ValueError("the training set is empty")
        if prompts_per_step % world_size:
            raise ValueError(f"prompts_per_step={prompts_per_step} must divide by the {world_size} processes")
        self.num_items = num_items
        self.per_step = prompts_per_step
        self.micro = micro_batch_prompts
        self.seed = seed
        self.shuffle = shuffle
        self.start_step = start_step
        self.num_steps = num_steps
        self.rank = rank
        self.world = world_size
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)
            self._orders = {epoch: order}  # keep one epoch: steps walk forward
        return self._orders[epoch]

    def step_indices(self, step: int) -> list[int]:
        """Global indices of the prompts used at ``step`` (all processes)."""
        first = step * self.per_step
        out = []
        for pos in range(first, first + self.per_step):
            epoch, offset = divmod(pos, self.num_items)
            out.append(int(self._order(epoch)[offset]))
        return out

    def micro_batches_per_step(self) -> int:
        local = self.per_step // self.world
        return -(-local // self.micro)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.num_steps):
            local = self.step_indices(step)[self.rank :: self.world]
            for i in range(0, len(local), self.micro):
                yield local[i : i + self.micro]

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step) * self.micro_batches_per_step()
