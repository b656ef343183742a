"""A randomly initialised model from a real checkpoint's small files (``vopd model random``).

A real checkpoint folder without its weights still holds everything that decides how a model is
prompted and parsed: ``config.json`` (shapes, vocabulary, special-token ids, rope), the tokenizer
files, the chat template, the image processor's pixel budget and ``generation_config.json``
(stop tokens). :func:`write_random_model` builds the model that ``config.json`` describes with
random weights, optionally shallower and narrower, and writes an ordinary Hugging Face folder:
``model.safetensors`` + ``config.json``, and the source's tokenizer, template, processor and
generation files copied byte for byte. Every vopd command then uses that folder as a local model.

What shrinking keeps (so prompts, image tokens and positions behave as in the real model):

- the vocabulary size, every special-token id, ``tie_word_embeddings``;
- the attention head dimension, hence the rope / mrope sections (``mrope_section`` sums to half
  the rotated head dimension) and ``partial_rotary_factor``; ``--hidden`` sets the number of
  query heads to ``hidden / head_dim`` and keeps the query-to-KV head ratio where it divides;
- the vision tower's patch, merge and temporal patch sizes, window size, position embeddings and
  head dimension (``--vision-hidden`` sets its number of heads); its output width follows the
  text width.

What shrinking changes: each MLP's width scales with its hidden size (rounded to a multiple of 64);
per-layer lists keep their last ``--layers`` entries (so a hybrid model's pattern keeps its full
attention layer); the vision tower's full-attention blocks (Qwen2.5-VL) and deepstack indexes
(Qwen3-VL) are mapped onto the shallower tower in proportion (see :func:`shrink_config`).

Never a substitute for real weights: answers are random. See docs/real_checkpoints.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vopd.outputs import public_weight_modes

__all__ = ["COPIED_FILES", "MARKER", "RandomModel", "shrink_config", "write_random_model"]

#: Files copied unchanged from the source folder when present (never weights).
COPIED_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)

#: Written into the output folder: what made it (source, its config's sha256, the shrink, the seed).
MARKER = "vopd_random_model.json"

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RandomModel:
    """What :func:`write_random_model` wrote."""

    out: Path
    model_type: str
    parameters: int
    copied: tuple[str, ...]

    def report(self) -> str:
        return (
            f"wrote a random {self.model_type} with {self.parameters:,} parameters to {self.out} "
            f"(copied unchanged: {', '.join(self.copied)})"
        )


def _text_section(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings: ``text_config`` when nested, else the top level (old flat layout)."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _spread(indexes: list[int], old_depth: int, new_depth: int) -> list[int]:
    """Map layer indexes of a tower of `old_depth` blocks onto one of `new_depth`, in proportion."""
    return sorted({min(new_depth - 1, (i * new_depth) // old_depth) for i in indexes})


def shrink_config(
    config: dict[str, Any],
    *,
    layers: int | None = None,
    vision_layers: int | None = None,
    hidden: int | None = None,
    vision_hidden: int | None = None,
) -> dict[str, Any]:
    """A copy of a config dict (``PretrainedConfig.to_dict()`` layout) with depth and width shrunk.

    Raises ValueError when the request cannot keep a head dimension (`hidden` or `vision_hidden`
    not a multiple of it) or a count is below 1.
    """
    out = copy.deepcopy(config)
    text = _text_section(out)
    vision = out.get("vision_config") if isinstance(out.get("vision_config"), dict) else None
    sizes = (("layers", layers), ("vision_layers", vision_layers), ("hidden", hidden), ("vision_hidden", vision_hidden))
    for name, value in sizes:
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if layers is not None:
        old = int(text["num_hidden_layers"])
        text["num_hidden_layers"] = layers
        for key, value in list(text.items()):
            if isinstance(value, list) and len(value) == old and key.endswith("layer_types"):
                text[key] = value[-layers:]  # the last entries: a hybrid pattern ends in its full layer
        if "max_window_layers" in text:
            text["max_window_layers"] = min(int(text["max_window_layers"]), layers)
    if hidden is not None:
        old_hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or old_hidden // heads)
        if hidden % head_dim:
            raise ValueError(
                f"--hidden {hidden} is not a multiple of the head dimension {head_dim}: the rope sections are "
                f"set for that head dimension; use a multiple of {head_dim}"
            )
        new_heads = hidden // head_dim
        kv = int(text.get("num_key_value_heads") or heads)
        group = max(1, heads // kv)
        new_kv = max(1, new_heads // group)
        while new_heads % new_kv:  # grouped-query attention needs whole groups
            new_kv -= 1
        text["head_dim"] = head_dim  # explicit: it no longer equals hidden / heads for every family
        text["hidden_size"] = hidden
        text["num_attention_heads"] = new_heads
        text["num_key_value_heads"] = new_kv
        text["intermediate_size"] = _round_to(int(text["intermediate_size"]) * hidden / old_hidden, 64)
        # Linear-attention (Gated-DeltaNet) heads shrink with the attention heads, keeping their ratio.
        if "linear_num_key_heads" in text and "linear_num_value_heads" in text:
            keys, values = int(text["linear_num_key_heads"]), int(text["linear_num_value_heads"])
            new_keys = max(1, keys * new_heads // heads)
            text["linear_num_key_heads"] = new_keys
            text["linear_num_value_heads"] = new_keys * max(1, values // keys)
        if vision is not None and "out_hidden_size" in vision:
            vision["out_hidden_size"] = hidden
    if vision_hidden is not None:
        if vision is None or "num_heads" not in vision:
            raise ValueError("--vision-hidden: this config has no vision_config.num_heads to shrink")
        old_hidden, heads = int(vision["hidden_size"]), int(vision["num_heads"])
        head_dim = old_hidden // heads
        if vision_hidden % head_dim:
            raise ValueError(
                f"--vision-hidden {vision_hidden} is not a multiple of the vision head dimension {head_dim}; "
                f"use a multiple of {head_dim}"
            )
        vision["hidden_size"] = vision_hidden
        vision["num_heads"] = vision_hidden // head_dim
        if "intermediate_size" in vision:
            vision["intermediate_size"] = _round_to(int(vision["intermediate_size"]) * vision_hidden / old_hidden, 16)
    if vision_layers is not None:
        if vision is None or "depth" not in vision:
            raise ValueError("--vision-layers: this config has no vision_config.depth to shrink")
        old = int(vision["depth"])
        vision["depth"] = vision_layers
        if vision.get("fullatt_block_indexes"):
            # The real towers end in a full-attention block (Qwen2.5-VL: 7, 15, 23, 31 of 32).
            vision["fullatt_block_indexes"] = sorted(
                set(_spread(vision["fullatt_block_indexes"], old, vision_layers)) | {vision_layers - 1}
            )
        if vision.get("deepstack_visual_indexes"):
            vision["deepstack_visual_indexes"] = _spread(vision["deepstack_visual_indexes"], old, vision_layers)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_random_model(
    src: str | Path,
    out: str | Path,
    *,
    layers: int | None = None,
    vision_layers: int | None = None,
    hidden: int | None = None,
    vision_hidden: int | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> RandomModel:
    """Build the model of ``src/config.json`` with random weights and write it, with src's small files, to `out`.

    Args:
        src: a checkpoint folder (weights not needed) with ``config.json``.
        out: a new or empty folder; a folder with other content is refused (never overwritten).
        layers, vision_layers, hidden, vision_hidden: shrink the text depth, the vision depth, the
            text width, the vision width (None keeps the source's value); see :func:`shrink_config`.
        dtype: weights' dtype on disk; None keeps the config's (bfloat16 for the Qwen releases).
        seed: seeds the random initialisation.

    Raises FileNotFoundError (no config.json), FileExistsError (`out` not empty) and ValueError
    (a shrink that breaks the shapes, a model that is not image-text-to-text, an unknown dtype).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    src, out = Path(src).expanduser(), Path(out).expanduser()
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{src}: no config.json; pass a checkpoint folder (its weights are not needed)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out (nothing is overwritten)")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(_DTYPES)}")

    source = AutoConfig.from_pretrained(src)  # local folder: never the hub, never remote code
    model_type = source.model_type
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not an image-text-to-text model; vopd model random "
            "builds vision-language checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, ...)"
        )
    settings = shrink_config(
        source.to_dict(), layers=layers, vision_layers=vision_layers, hidden=hidden, vision_hidden=vision_hidden
    )
    for key in ("transformers_version", "architectures", "_name_or_path"):
        settings.pop(key, None)
    config = AutoConfig.for_model(model_type, **{k: v for k, v in settings.items() if k != "model_type"})
    config.architectures = source.architectures
    declared = getattr(source, "dtype", None) or getattr(source.get_text_config(), "dtype", None)
    name = dtype or str(declared or "float32").replace("torch.", "")
    torch_dtype = getattr(torch, name if name in _DTYPES else "float32")

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    parameters = sum(p.numel() for p in model.parameters())

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    public_weight_modes(out)  # the safetensors writer makes 0600 files
    copied = []
    for file in COPIED_FILES:  # after save_pretrained: src's generation_config.json replaces the default one
        if (src / file).is_file():
            shutil.copyfile(src / file, out / file)
            copied.append(file)
    record = {
        "made_by": "vopd model random",
        "source": str(src.resolve()),
        "source_config_sha256": _sha256(config_file),
        "layers": layers,
        "vision_layers": vision_layers,
        "hidden": hidden,
        "vision_hidden": vision_hidden,
        "dtype": name,
        "seed": seed,
        "parameters": parameters,
        "copied": copied,
    }
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return RandomModel(out=out, model_type=model_type, parameters=parameters, copied=tuple(copied))
