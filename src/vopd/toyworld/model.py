"""The toy world's tiny Qwen2-VL (about 1.3 M parameters) and its grading rule.

The model is a real ``Qwen2VLForConditionalGeneration`` built from a config by
:func:`vopd.tiny_models.build_tiny_model`, with the toy-world sizes: text hidden 128, 4 layers,
4 heads / 2 KV heads, FFN 256, M-RoPE ``mrope_section=[4, 6, 6]``, rope theta 1e4; vision embed
96, depth 4, 4 heads, MLP ratio 2, patch 14, merge 2. A 168 px scene is 12 x 12 patches, i.e.
36 image tokens after the 2 x 2 merge; the 112 px teacher crop is 16 tokens.

The tokenizer is byte-level BPE trained on the world's own sentences (questions, answers, the
paper's hint, the chat roles), so every colour and shape word is one token and an answer such as
``The triangle is blue.`` is a handful of tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vopd.records import Sample
from vopd.tiny_models import build_tiny_model
from vopd.toyworld.scenes import COLOURS, SHAPES, answer_text, question_text
from vopd.views import HINT

__all__ = [
    "TOY_TEXT",
    "TOY_VISION",
    "TOY_IMAGE_PIXELS",
    "TOY_BASE_DIR",
    "toy_base_path",
    "toy_corpus",
    "build_toy_model",
    "toy_answer_colour",
    "toy_answer_correct",
]

TOY_TEXT: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    # head_dim 32 -> rotary dim 32 -> the three M-RoPE sections (t, h, w) sum to 16.
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
}
TOY_VISION: dict[str, Any] = {
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
#: Pixel budget of the image processor: a 168 x 168 scene passes unresized (36 tokens).
TOY_IMAGE_PIXELS: tuple[int, int] = (28 * 28, 168 * 168)

#: The shipped base checkpoint (inside the package, so an install carries it).
TOY_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_base"

_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)


def toy_corpus() -> list[str]:
    """Every sentence the toy world produces, plus the hint and the chat roles."""
    lines = [question_text(s) for s in SHAPES]
    lines += [answer_text(s, c) for s in SHAPES for c in COLOURS]
    lines += [HINT, "user", "assistant", " ".join(COLOURS), " ".join(SHAPES)]
    # Repeat so the BPE trainer merges whole words (frequency beats the 6-way colour split).
    return lines * 8


def build_toy_model(seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised toy Qwen2-VL and its processor (fp32, eval mode, CPU)."""
    model, processor = build_tiny_model(
        "qwen2_vl",
        seed=seed,
        text=dict(TOY_TEXT),
        vision=dict(TOY_VISION),
        tokenizer_corpus=toy_corpus(),
    )
    _set_pixel_budget(processor, *TOY_IMAGE_PIXELS)
    return model, processor


def _set_pixel_budget(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Let whole 168 px scenes through (the library default budget is for 112 px images)."""
    from transformers import Qwen2VLImageProcessorPil

    old = processor.image_processor
    processor.image_processor = Qwen2VLImageProcessorPil(
        patch_size=old.patch_size,
        merge_size=old.merge_size,
        temporal_patch_size=old.temporal_patch_size,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def toy_base_path() -> Path:
    """Folder of the shipped toy base checkpoint (model, processor, ``toy_base.json``).

    Raises:
        FileNotFoundError: the checkpoint is missing (rebuild it with
            ``vopd toyworld pretrain --out src/vopd/assets/toy_base``).
    """
    if not (TOY_BASE_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"toy base checkpoint not found in {TOY_BASE_DIR}; rebuild it with "
            f"`vopd toyworld pretrain --out {TOY_BASE_DIR}` (about 3-5 min on 2 CPU cores)"
        )
    return TOY_BASE_DIR


def toy_answer_colour(text: str) -> str | None:
    """The first colour word in a response (lower case), or None if there is none."""
    found = _COLOUR_RE.search(text)
    return found.group(1).lower() if found else None


def toy_answer_correct(text: str, sample: Sample) -> bool:
    """True when the response's first colour word is the target's colour.

    The colour comes from ``sample.meta["colour"]`` (written by the scene generator), or else
    from the reference answer sentence.
    """
    truth = sample.meta.get("colour") if sample.meta else None
    if truth is None:
        truth = toy_answer_colour(sample.answer or "")
    if truth is None:
        raise ValueError(f"sample {sample.id!r}: no colour in meta['colour'] or in the answer")
    return toy_answer_colour(text) == truth.lower()
