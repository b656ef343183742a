"""Toy-world accuracy per view: the regional-to-global gap of a model on toy scenes.

Four views of one scene, all built with :mod:`vopd.views` and :data:`TOY_VIEW`:

- ``full``: the clean full image, question only (the target metric of the demo);
- ``crop``: the teacher's view, a 56 px window around the target zoomed 2x to 112 px;
- ``boxed_full``: the full image with the red evidence box, question + the paper's hint
  (the Vision-OPD-6K student input);
- ``boxed_crop``: the same window cut from the boxed image, question + hint (used in base
  pretraining so that the paper-style teacher input is in distribution).

Decoding is greedy through the library's rollout engine (vision tokens blocked). A response is
right when its first colour word is the target's colour (:func:`toy_answer_correct`).

Prompt batches (the processor's pixel values and token ids) can be prepared once with
:func:`prepare_views` and reused across evaluations of a changing model: during a demo the same
held-out scenes are evaluated several times.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from vopd.config import RolloutConfig, ViewConfig
from vopd.models import build_prompts
from vopd.records import Sample
from vopd.rollout import HFGenerateEngine
from vopd.toyworld.model import toy_answer_correct
from vopd.toyworld.scenes import TOY_VIEW, VIEWS, view_input

__all__ = [
    "PreparedViews",
    "ViewEval",
    "prepare_views",
    "evaluate_views",
    "HeldOutEvaluator",
]

# Longest toy answer is 5 tokens + <|im_end|>; two spare tokens show babbling without cost.
DEFAULT_MAX_NEW_TOKENS = 8


@dataclasses.dataclass
class PreparedViews:
    """Prompt batches for a fixed list of samples, per view (reusable across evaluations)."""

    samples: list[Sample]
    batches: dict[str, list[Any]]
    batch_size: int


@dataclasses.dataclass
class ViewEval:
    """Result of :func:`evaluate_views`.

    Attributes:
        accuracy: view -> fraction of samples answered correctly.
        correct: view -> per-sample correctness, in sample order (for paired tests).
        responses: view -> decoded responses, in sample order.
        seconds: view -> wall seconds spent decoding (processor time is in ``prepare_seconds``).
        prepare_seconds: wall seconds spent building views and prompt batches (0 when reused).
    """

    accuracy: dict[str, float]
    correct: dict[str, list[bool]]
    responses: dict[str, list[str]]
    seconds: dict[str, float]
    prepare_seconds: float = 0.0

    def gap(self, regional: str = "crop", global_: str = "full") -> float:
        """Accuracy of the regional view minus that of the global view."""
        return self.accuracy[regional] - self.accuracy[global_]


def prepare_views(
    processor: Any,
    samples: Sequence[Sample],
    *,
    views: Sequence[str] = VIEWS,
    batch_size: int = 250,
    view_cfg: ViewConfig = TOY_VIEW,
) -> PreparedViews:
    """Build the views and run the processor once; the result feeds :func:`evaluate_views`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = list(samples)
    batches: dict[str, list[Any]] = {}
    for view in views:
        pairs = [view_input(s, view, view_cfg) for s in samples]
        batches[view] = [
            build_prompts(
                processor, [im for im, _ in pairs[i : i + batch_size]], [tx for _, tx in pairs[i : i + batch_size]]
            )
            for i in range(0, len(pairs), batch_size)
        ]
    return PreparedViews(samples=samples, batches=batches, batch_size=batch_size)


def evaluate_views(
    model: Any,
    processor: Any,
    samples: Sequence[Sample] | PreparedViews,
    *,
    views: Sequence[str] = VIEWS,
    batch_size: int = 250,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    view_cfg: ViewConfig = TOY_VIEW,
) -> ViewEval:
    """Greedy accuracy of ``model`` on each view of ``samples``.

    Args:
        samples: toy samples, or a :class:`PreparedViews` from :func:`prepare_views` (then
            ``batch_size`` and ``view_cfg`` are those it was prepared with, and ``views`` must be
            among its views).
        batch_size: prompts per ``generate`` call; larger is faster on CPU up to a few hundred.
        max_new_tokens: decoding budget per response.

    Returns:
        A :class:`ViewEval` with accuracy, per-sample correctness and responses per view.
    """
    start = time.perf_counter()
    if isinstance(samples, PreparedViews):
        prepared = samples
        missing = [v for v in views if v not in prepared.batches]
        if missing:
            raise ValueError(f"views {missing} were not prepared (have {list(prepared.batches)})")
    else:
        prepared = prepare_views(processor, samples, views=views, batch_size=batch_size, view_cfg=view_cfg)
    prepare_seconds = time.perf_counter() - start if prepared is not samples else 0.0
    engine = HFGenerateEngine(processor)
    greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    tok = getattr(processor, "tokenizer", processor)
    result = ViewEval({}, {}, {}, {}, prepare_seconds)
    for view in views:
        t0 = time.perf_counter()
        texts: list[str] = []
        for batch in prepared.batches[view]:
            rollouts = engine.sample(model, batch, greedy)
            ids = rollouts.response_ids_B_T.masked_fill(~rollouts.mask_B_T, tok.pad_token_id)
            texts += tok.batch_decode(ids, skip_special_tokens=True)
        flags = [toy_answer_correct(t, s) for t, s in zip(texts, prepared.samples)]
        result.responses[view] = texts
        result.correct[view] = flags
        result.accuracy[view] = sum(flags) / max(len(flags), 1)
        result.seconds[view] = time.perf_counter() - t0
    return result


class HeldOutEvaluator:
    """Trainer callback: held-out accuracy of the student per view every ``every`` steps.

    The prompt batches are prepared once; ``curve`` collects ``{"step", <view>: accuracy}`` rows
    and ``last`` holds the newest :class:`ViewEval` (for paired tests and example plots).
    """

    def __init__(self, samples: Sequence[Sample], every: int, processor: Any, *, views: Sequence[str] = VIEWS):
        self.every = every
        self.views = tuple(views)
        self.prepared = prepare_views(processor, samples, views=self.views)
        self.curve: list[dict[str, Any]] = []
        self.last: ViewEval | None = None

    def evaluate(self, model: Any, processor: Any, step: int) -> dict[str, float]:
        """Evaluate ``model`` now; returns ``eval/<view>`` metrics for the trainer's log."""
        result = evaluate_views(model, processor, self.prepared, views=self.views)
        self.last = result
        self.curve.append({"step": step, **result.accuracy})
        return {f"eval/{k}": v for k, v in result.accuracy.items()}

    def __call__(self, state: Any) -> dict[str, float]:
        if state.step % self.every:
            return {}
        return self.evaluate(state.policy, state.processor, state.step)
