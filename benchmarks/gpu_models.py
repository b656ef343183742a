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

``--dry-run`` shrinks every shape (:func:`shrink`: 2 text layers of width 64, a 2-block vision
tower of width 64) and keeps the real vocabulary, ids, patch sizes and rope layout, so the CPU run
takes the same code paths in seconds.
"""

from __future__ import annotations

import copy
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


def shrink(config: dict[str, Any], *, hidden: int = 64, layers: int = 2, vision_width: int = 64) -> dict[str, Any]:
    """A tiny copy of ``config`` for the CPU dry run: ``layers`` text layers of width ``hidden`` (head
    dim 32, so the mrope sections are rescaled to sum to 16), a 2-block vision tower of width
    ``vision_width``; vocabulary, token ids, patch/merge sizes and rope type unchanged."""
    out = copy.deepcopy(config)
    text = _text(out)
    head_dim = 32
    text.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        intermediate_size=2 * hidden,
    )
    for rope_key in ("rope_scaling", "rope_parameters"):
        rope = out.get(rope_key) if rope_key in out else text.get(rope_key)
        if rope and "mrope_section" in rope:
            rope["mrope_section"] = [6, 5, 5] if rope.get("mrope_interleaved") else [4, 6, 6]
    if "max_window_layers" in text:
        text["max_window_layers"] = layers
    vision = out["vision_config"]
    vision.update(depth=2, hidden_size=vision_width, num_heads=2, out_hidden_size=hidden)
    if "intermediate_size" in vision:
        vision["intermediate_size"] = 2 * vision_width
    if "embed_dim" in vision:
        vision["embed_dim"] = vision_width
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [1]
    if "deepstack_visual_indexes" in vision:
        vision["deepstack_visual_indexes"] = [0]
    return out


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
