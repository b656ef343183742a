"""The settings of ``vopd data build``, one dataclass per stage, and the fingerprint that keys a stage's cache.

Each stage's cache file is named by the fingerprint of what makes its outputs (the model name,
the prompt, the sampling settings, the views the model is shown), so a rerun with another writer
or filter starts a new cache and never reads the old one. The server URL and the API key are not
part of it: the same model served elsewhere gives the same answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vopd.config import ViewConfig

__all__ = ["BuildConfig", "ChatConfig", "FilterConfig", "RegionConfig", "WriterConfig", "fingerprint", "view_settings"]

#: How model proposals are made without a question: the question the proposer is asked about every image.
DEFAULT_PROPOSE_QUESTION = "Which small detail of this image is worth a closer look?"


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (sorted keys): the name of what made a cache."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class RegionConfig:
    """Where the evidence boxes come from and which are small enough to keep.

    Attributes:
        boxes_file: JSONL of ``{"image": PATH, "boxes": [[x1, y1, x2, y2], ...], "labels": [...]}``
            (a detector's output; paths relative to the file's folder); ``box_format`` and
            ``box_normalized`` as in our record format. Exclusive with ``propose_model``.
        propose_model: model spec or folder whose own proposal is each image's one region.
        propose_source: ``attention``, ``search`` or ``grounding`` (docs/proposals.md).
        propose_question: the question the proposer is asked about every image (there is none yet).
        propose_batch_size: prompts per forward pass of the proposer.
        max_area: keep a region when its area is at most this fraction of the image (the paper's
            small-region rule).
        min_side: keep a region when both its sides are at least this many pixels.
    """

    boxes_file: str | None = None
    propose_model: str | None = None
    propose_source: str = "attention"
    propose_question: str = DEFAULT_PROPOSE_QUESTION
    propose_batch_size: int = 16
    max_area: float = 0.15
    min_side: float = 8.0

    def __post_init__(self) -> None:
        if (self.boxes_file is None) == (self.propose_model is None):
            raise ValueError("regions: give exactly one of --boxes FILE or --propose-model MODEL")
        if not 0 < self.max_area <= 1:
            raise ValueError(f"--max-area must be in (0, 1], got {self.max_area}")
        if self.min_side < 1:
            raise ValueError(f"--min-side must be >= 1 pixel, got {self.min_side}")
        if self.propose_batch_size < 1:
            raise ValueError(f"--propose-batch-size must be >= 1, got {self.propose_batch_size}")


@dataclass
class ChatConfig:
    """How to reach an OpenAI-compatible server (writer or filter).

    Attributes:
        url: base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name.
        api_key_env: NAME of the environment variable holding the key (unset is fine locally).
        concurrency: requests in flight.
        timeout_s: wall-clock limit per request attempt.
        retries: extra attempts per request before it counts as failed (and its item as dropped).
        backoff_s: first retry delay (doubles each retry).
        thinking: the chat template's thinking switch, sent as ``chat_template_kwargs.enable_thinking``
            (vLLM, SGLang); None sends no ``chat_template_kwargs`` (hosted APIs that reject unknown fields).
    """

    url: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 0.5
    thinking: bool | None = False

    def __post_init__(self) -> None:
        from vopd.evaluation.backends import check_env_name

        check_env_name(self.api_key_env, "--api-key-env")
        if self.concurrency < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError(
                f"concurrency ({self.concurrency}) must be >= 1, retries ({self.retries}) >= 0, "
                f"timeout ({self.timeout_s}) > 0"
            )


@dataclass
class WriterConfig:
    """The question writer.

    Attributes:
        chat: its server and model.
        prompt: the prompt template (:data:`vopd.databuild.writer.DEFAULT_WRITER_PROMPT` when None).
        show_full: also show the full image with the region's box drawn in red (second image).
        temperature: sampling temperature of the writer (0: greedy).
        max_tokens: reply budget.
    """

    chat: ChatConfig = field(default_factory=ChatConfig)
    prompt: str | None = None
    show_full: bool = False
    temperature: float = 0.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.chat.url or not self.chat.model:
            raise ValueError("the writer needs --writer-url and --writer-model")
        if self.temperature < 0 or self.max_tokens < 1:
            raise ValueError(f"writer temperature must be >= 0 and max tokens >= 1, got {self.temperature}")


@dataclass
class FilterConfig:
    """The answer filter (the paper: a strong model's sampled answers on the region agree > 75 %).

    Attributes:
        chat: its server and model (None with ``local_model``).
        local_model: a model spec or folder answered with the local HF sampler instead of a server.
        samples: answers sampled per question (on the crop; again on the full image with ``drop_easy``).
        temperature: sampling temperature (> 0: the agreement of samples is the signal).
        agree: keep a question when the majority answer is the writer's and holds more than
            this fraction of the samples.
        drop_easy: also drop questions the filter answers from the clean full image with the
            same agreement (nothing to learn: the full image already suffices).
        max_tokens: reply budget per answer.
        seed: torch seed of the local sampler.
    """

    chat: ChatConfig | None = None
    local_model: str | None = None
    samples: int = 8
    temperature: float = 1.0
    agree: float = 0.75
    drop_easy: bool = False
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.chat is None) == (self.local_model is None):
            raise ValueError("the filter needs exactly one of --filter-url/--filter-model or --filter-local MODEL")
        if self.chat is not None and (not self.chat.url or not self.chat.model):
            raise ValueError("the filter needs both --filter-url and --filter-model")
        if self.samples < 1 or self.temperature <= 0 or self.max_tokens < 1:
            raise ValueError(
                f"--filter-samples must be >= 1 ({self.samples}) and --filter-temperature > 0 ({self.temperature})"
            )
        if not 0 <= self.agree < 1:
            raise ValueError(f"--filter-agree must be in [0, 1), got {self.agree}")

    @property
    def model_name(self) -> str:
        return self.local_model if self.local_model is not None else self.chat.model  # type: ignore[union-attr]


@dataclass
class BuildConfig:
    """One ``vopd data build`` run.

    Attributes:
        images: folders (searched recursively), image files, or ``.txt`` files listing image paths.
        out: the output JSONL; its caches live in ``<stem>.build/`` beside it, with the summary
            ``<stem>.summary.json`` and the gallery ``<stem>.gallery.png``.
        regions / writer / filter: the stages' settings.
        views: how crops are cut (the teacher view of training: pass the training config's views).
        limit: only the first N regions after the area rule (a cheap trial run).
        gallery: questions shown in the gallery (0: no gallery).
        progress: progress bars.
    """

    images: list[str]
    out: str
    regions: RegionConfig
    writer: WriterConfig
    filter: FilterConfig
    views: ViewConfig = field(default_factory=ViewConfig)
    limit: int | None = None
    gallery: int = 12
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("give at least one image folder, image file or list file")
        if Path(self.out).suffix != ".jsonl":
            raise ValueError(f"--out must be a .jsonl file, got {self.out!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.gallery < 0:
            raise ValueError(f"--gallery must be >= 0, got {self.gallery}")


def view_settings(views: ViewConfig) -> dict[str, Any]:
    """The view knobs that change what a model is shown (they enter the writer's and filter's fingerprints)."""
    keep = ("context", "min_side", "zoom", "max_pixels", "box_color", "box_width", "box_margin")
    return {k: v for k, v in dataclasses.asdict(views).items() if k in keep}
