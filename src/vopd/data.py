"""Training data pipeline: samples -> (student view, teacher view, text) -> prompt batches.

Views (crops, red boxes) and processor calls run inside data-loader workers (``data.num_workers``),
never serially in the training step. The order of prompts is a pure function of (seed, step), so a
resumed run sees exactly the prompts an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vopd.images import load_image
from vopd.models import build_prompts
from vopd.datasets import load_records  # every registered layout (our JSONL, Vision-OPD-6K)
from vopd.records import Sample
from vopd.specs import data_spec_loader
from vopd.views import ViewConfig, make_views, prompt_text, student_view


@dataclass
class PromptPair:
    """One micro-batch of prompts: the same questions under the student and the teacher view."""

    student: Any  # BatchFeature, left-padded, one row per prompt
    teacher: Any
    sample_ids: list[str]


def load_train_samples(spec: str, *, out_of_bounds: str = "clip", on_error: str = "raise") -> list[Sample]:
    """Load training samples from a JSONL path or folder, or from a registered data spec such as
    ``toyworld:N[:SEED]`` (see :mod:`vopd.specs`)."""
    load = data_spec_loader(spec)
    if load is not None:
        return load(spec)
    if not spec:
        raise ValueError("data.train is empty: give a JSONL file (see docs/data.md) or toyworld:N")
    # check_images: read every image header now (no pixel decoding), so a missing or unreadable
    # file and a box outside its image are found before step 1, named by file:row, and skipped
    # with on_error=skip; without the sizes, out_of_bounds could neither clip-and-count nor reject.
    loaded = load_records(spec, out_of_bounds=out_of_bounds, on_error=on_error, check_images=True)
    if loaded.skipped or loaded.clipped:
        warnings.warn(loaded.report, stacklevel=2)  # skipped rows are counted and reported, never silent
    return list(loaded.samples)


class ViewDataset(torch.utils.data.Dataset):
    """Item i -> (id, student image, teacher image, prompt text)."""

    def __init__(self, samples: list[Sample], views: ViewConfig, *, teacher_sees: str = "crop"):
        self.samples = samples
        self.views = views
        self.teacher_sees = teacher_sees

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, Image.Image, Image.Image, str]:
        sample = self.samples[i]
        if self.teacher_sees == "crop":
            student, teacher, text = make_views(sample, self.views)
            return sample.id, student, teacher, text
        # Control: no privileged view. The teacher sees exactly what the student sees.
        image = load_image(sample.image, where=f"sample {sample.id}")
        student = student_view(image, sample.boxes, self.views)
        return sample.id, student, student, prompt_text(sample, hint=self.views.hint)


class PairCollator:
    """Turns view items into a :class:`PromptPair` with the model's processor."""

    def __init__(self, processor: Any, *, thinking: bool | None, max_prompt_tokens: int | None):
        self.processor = processor
        self.thinking = thinking
        self.max_prompt_tokens = max_prompt_tokens

    def __call__(self, items: list[tuple[str, Image.Image, Image.Image, str]]) -> PromptPair:
        ids = [it[0] for it in items]
        texts = [it[3] for it in items]
        kw = dict(thinking=self.thinking, max_prompt_tokens=self.max_prompt_tokens)
        student = build_prompts(self.processor, [it[1] for it in items], texts, **kw)
        teacher = build_prompts(self.processor, [it[2] for it in items], texts, **kw)
        return PromptPair(student=student, teacher=teacher, sample_ids=ids)


class StepSampler(torch.utils.data.Sampler[list[int]]):
    """Yields micro-batches of indices; step s uses prompts [s*P, (s+1)*P) of a seeded per-epoch order.

    Each process takes its own shard of every step's prompts. ``start_step`` resumes exactly.
    """

    def __init__(
        self,
        num_items: int,
        *,
        prompts_per_step: int,
        micro_batch: int,
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
        self.micro = micro_batch
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
