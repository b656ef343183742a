"""The model shapes of the GPU check (`bench_gpu.py`), built with random weights on the target device.

Shapes come from real checkpoints' ``config.json``:

- **Qwen2.5-VL-7B-Instruct** and **Qwen3-VL-8B-Instruct**: the files vendored under
  ``tests/data/real_models/`` (their source and licence are in the README there);
- **Qwen3-VL-2B-Instruct** is not vendored: :func:`real_config` takes the Qwen3-VL-8B file and sets
  the sizes that differ to those of the official ``Qwen/Qwen3-VL-2B-Instruct`` config.json on the
  Hugging Face hub (hidden 2048, 28 layers, 16 heads, 8 KV heads, head dim 128, MLP 6144, tied
  embeddings; vision depth 24, width 1024, MLP 4096, 16 heads, deepstack layers [5, 11, 17]; the
  rest, rope and vocabulary included, as 8B). Built on the meta device it has 2,127,532,032
  parameters (tests/test_gpu_check.py).

The tokenizer, chat template, image-processor settings and stop tokens are the real files of the
same folder (Qwen3-VL-2B uses the 8B folder's: the family shares them), so prompts, image tokens and
special-token ids are what a user's run has. Only the weights are random.

``--dry-run`` shrinks every shape (:func:`shrink`: 2 text layers of width 128, a 2-block vision
tower of one head) and keeps the real vocabulary, ids, head dimensions, patch sizes and rope
layout, so the CPU run takes the same code paths at a small cost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REAL_MODELS = REPO / "tests" / "data" / "real_models"

#: shape name -> the vendored folder whose config.json, tokenizer, processor and generation files it uses
SHAPES = {
    "qwen3_vl_2b": "qwen3_vl_8b_instruct",
    "qwen3_vl_8b": "qwen3_vl_8b_instruct",
    "qwen2_5_vl_7b": "qwen2_5_vl_7b_instruct",
}

# Qwen3-VL-2B-Instruct: the sizes that differ from Qwen3-VL-8B (the official config.json, see above).
_QWEN3_VL_2B_TEXT = {
    "hidden_size": 2048,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 6144,
}
_QWEN3_VL_2B_VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "deepstack_visual_indexes": [5, 11, 17],
}


def folder(shape: str) -> Path:
    """The vendored real-checkpoint folder whose small files ``shape`` uses."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    path = REAL_MODELS / SHAPES[shape]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json is missing: the real checkpoint files are vendored there")
    return path


def real_config(shape: str) -> dict[str, Any]:
    """The config dict of ``shape`` at full size (see the module docstring for where each comes from)."""
    config = json.loads((folder(shape) / "config.json").read_text())
    if shape == "qwen3_vl_2b":
        config["text_config"].update(_QWEN3_VL_2B_TEXT)
        config["vision_config"].update(_QWEN3_VL_2B_VISION)
        config["tie_word_embeddings"] = True
    return config


def _text(config: dict[str, Any]) -> dict[str, Any]:
    """The text settings: ``text_config`` when nested, else the top level (Qwen2.5-VL's flat layout)."""
    return config.get("text_config", config)


def shrink(config: dict[str, Any], *, hidden: int = 128, layers: int = 2) -> dict[str, Any]:
    """A small copy of ``config`` (`vopd.random_model.shrink_config`, as ``vopd model random`` shrinks):
    ``layers`` text layers of width ``hidden`` (a multiple of the head dimension, 128 here), a 2-block
    vision tower of one head; vocabulary, token ids, head dimensions, rope and patch sizes unchanged."""
    from vopd.random_model import shrink_config

    vision = config["vision_config"]
    one_head = int(vision["hidden_size"]) // int(vision["num_heads"])
    return shrink_config(config, layers=layers, vision_layers=2, hidden=hidden, vision_hidden=one_head)


def make_config(config: dict[str, Any]):
    """A transformers config object from a config dict (any layout transformers reads from config.json)."""
    from transformers import AutoConfig

    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (no memory, ~1 s)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(make_config(config))
    return sum(p.numel() for p in model.parameters())


def load_processor(shape: str):
    """The real processor of ``shape``'s folder (tokenizer, chat template, image processor) through
    vopd's one processor loader (the stock class, or the image-only one without torchvision)."""
    from vopd.models import load_processor as vopd_load_processor

    return vopd_load_processor(str(folder(shape)))


def build_model(config: dict[str, Any], shape: str, *, device: str, dtype: str, seed: int):
    """``config``'s model with random weights, created directly on ``device`` in ``dtype``, with the
    real ``generation_config.json`` of ``shape``'s folder (its stop tokens)."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(make_config(config), dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig.from_pretrained(folder(shape))
    return model.eval()


def register(name: str, config: dict[str, Any], shape: str, *, device: str) -> None:
    """Make ``name`` a vopd model spec (``model.path=name``) that builds ``config`` on ``device``."""
    from vopd.specs import register_model_spec

    def load(*, dtype: str, trust_remote_code: bool, attn_implementation: str | None, seed: int):
        model = build_model(config, shape, device=device, dtype=dtype, seed=seed)
        return model, load_processor(shape)

    register_model_spec(name, load)


def shape_summary(config: dict[str, Any], parameters: int) -> dict[str, Any]:
    """The numbers the FLOP count and the memory estimate need, read from ``config``."""
    text = _text(config)
    heads, head_dim = (
        text["num_attention_heads"],
        text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
    )
    return {
        "model_type": config["model_type"],
        "parameters": parameters,
        "hidden": text["hidden_size"],
        "layers": text["num_hidden_layers"],
        "attention_width": heads * head_dim,
        "intermediate": text["intermediate_size"],
        "vocab": text["vocab_size"] if "vocab_size" in text else config["vocab_size"],
        "tied": bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    }
