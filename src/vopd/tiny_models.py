"""Tiny, offline, randomly initialised vision-language models for tests, CI and the CPU demo.

Nothing here touches a model hub. `build_tiny_model(family)` returns a real Hugging Face
image-text-to-text model (the same class a hub checkpoint loads into) built from a small config,
plus a full processor: a byte-level BPE tokenizer trained on the spot with the family's special
tokens and chat template, and the family's PIL image processor.

Several stock processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL / Qwen3.5, SmolVLM, LLaVA-OneVision)
insist on a video processor, which needs torchvision (never installed here). The tiny
models use the `ImageOnly*` subclasses of `vopd.processors`, which drop it (re-exported here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from vopd.processors import (
    IMAGE_ONLY_PROCESSORS,
    ImageOnlyLlavaOnevisionProcessor,
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
    ImageOnlySmolVLMProcessor,
    register_image_only_processors,
)

__all__ = [
    "FAMILIES",
    "IMAGE_ONLY_PROCESSORS",
    "ImageOnlyLlavaOnevisionProcessor",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "ImageOnlySmolVLMProcessor",
    "build_tokenizer",
    "build_tiny_model",
    "save_tiny",
    "register_image_only_processors",
]

# ----------------------------------------------------------------------------------------------
# Chat templates (Jinja, as in the families' own templates, minus system prompts and tools).
# HF renders templates with trim_blocks/lstrip_blocks, so newlines go right after text or
# expressions, never right after a `{% ... %}` tag.

_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3.5 style: the generation prompt opens a <think> block unless enable_thinking is false,
# in which case an empty think block is emitted (the non-thinking mode).
_QWEN35_TEMPLATE = _QWEN_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}",
)

_LLAVA_OV_TEMPLATE = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")

_IDEFICS3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class _TokenizerSpec:
    """Special tokens (ids 0..len-1, in order) and roles for one family's tokenizer."""

    specials: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None
    chat_template: str
    # Extra attributes some processors read from the tokenizer (e.g. Gemma 3's boi_token).
    extra: dict[str, str] = field(default_factory=dict)
    # Added tokens that are ordinary text (not special), like Qwen3's <think>.
    added: tuple[str, ...] = ()


_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_IDEFICS3_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)

_TOKENIZER_SPECS: dict[str, _TokenizerSpec] = {
    "qwen2_vl": _TokenizerSpec(_QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", None, _QWEN_TEMPLATE),
    "qwen2_5_vl": _TokenizerSpec(_QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", None, _QWEN_TEMPLATE),
    "qwen3_vl": _TokenizerSpec(
        _QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", None, _QWEN_TEMPLATE, added=("<think>", "</think>")
    ),
    "qwen3_5": _TokenizerSpec(
        _QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", None, _QWEN35_TEMPLATE, added=("<think>", "</think>")
    ),
    "llava_onevision": _TokenizerSpec(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
        "<|im_end|>",
        "<|endoftext|>",
        None,
        _LLAVA_OV_TEMPLATE,
        extra={"image_token": "<image>", "video_token": "<video>"},
    ),
    "idefics3": _TokenizerSpec(
        _IDEFICS3_SPECIALS, "<end_of_utterance>", "<|endoftext|>", "<|im_start|>", _IDEFICS3_TEMPLATE
    ),
    "gemma3": _TokenizerSpec(
        (
            "<pad>",
            "<eos>",
            "<bos>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ),
        "<end_of_turn>",
        "<pad>",
        "<bos>",
        _GEMMA3_TEMPLATE,
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    ),
}
_TOKENIZER_SPECS["smolvlm"] = _TOKENIZER_SPECS["idefics3"]

FAMILIES: tuple[str, ...] = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "idefics3",
    "smolvlm",
    "llava_onevision",
    "gemma3",
)

# A small built-in corpus: the toy world's words plus the paper's prompt sentences, so that
# colour words and option letters are single tokens.
_DEFAULT_CORPUS: tuple[str, ...] = (
    "What color is the circle? What color is the square? What color is the triangle?",
    "blue green yellow purple orange cyan red black white gray brown pink",
    " blue green yellow purple orange cyan red black white gray brown pink",
    "Only focus on the objects inside the red bounding box in the image to answer this question.",
    "Answer with the option's letter from the given choices directly.",
    "A. B. C. D. E. (A) (B) (C) (D) A B C D E Yes No yes no",
    "The answer is 0 1 2 3 4 5 6 7 8 9 10 11 12. How many objects are there in the image?",
    "Is the object on the left or on the right of the boat? It is above, below, near, far.",
    "The triangle is blue. The circle is green. The square is yellow. The number is 7.",
)


def build_tokenizer(corpus: list[str] | None = None, *, family: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline with `family`'s special tokens and chat template.

    Special tokens get ids 0..S-1 in the family's order; every byte has a token, so any text is
    encodable. `vocab_size` counts specials, the 256 bytes and the learned merges.
    """
    spec = _family_tokenizer_spec(family)
    text = list(corpus) if corpus is not None else list(_DEFAULT_CORPUS)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=spec.eos,
        pad_token=spec.pad,
        bos_token=spec.bos,
        unk_token=None,
        extra_special_tokens=dict(spec.extra) or None,
    )
    if spec.added:
        tok.add_tokens(list(spec.added), special_tokens=False)
    tok.chat_template = spec.chat_template
    tok.padding_side = "left"
    return tok


def _family_tokenizer_spec(family: str) -> _TokenizerSpec:
    try:
        return _TOKENIZER_SPECS[family]
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}") from None


# ----------------------------------------------------------------------------------------------
# Model + processor builders.

# Default tiny sizes: hidden 64, 2 layers. Image processors are set so that a 56-112 px image
# becomes a handful of tokens (Qwen: patch 14, merge 2 -> a 112 px square is 16 tokens).
_QWEN_PIXELS = {"min_pixels": 28 * 28, "max_pixels": 112 * 112}


def _merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    out.update(override or {})
    return out


def _token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id}


def _qwen_vision_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    return dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), ids))


def _qwen_image_processor(patch_size: int, merge_size: int):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2, **_QWEN_PIXELS)


def _tiny_qwen_vision(out_hidden: int) -> dict[str, Any]:
    """The vision tower Qwen2.5-VL, Qwen3-VL and Qwen3.5 share at tiny size (14 px patches, 2x2 merge)."""
    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": out_hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _build_qwen(family: str, tok, text: dict | None, vision: dict | None):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5: M-RoPE text model + patch/merge vision tower."""
    from transformers import AutoConfig

    hidden = (text or {}).get("hidden_size", 64)
    text_base: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        **_token_ids(tok),
    }
    if family == "qwen2_vl":
        # head_dim 16 -> rotary dim 16 -> mrope_section must sum to 8.
        text_base["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision_base = {
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    elif family == "qwen2_5_vl":
        text_base["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision_base = {**_tiny_qwen_vision(hidden), "window_size": 56, "fullatt_block_indexes": [1]}
    elif family == "qwen3_vl":
        text_base["head_dim"] = 16
        text_base["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision_base = {**_tiny_qwen_vision(hidden), "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    elif family == "qwen3_5":
        # Hybrid: one Gated-DeltaNet (linear attention) layer, one full-attention layer.
        # head_dim 32 x partial_rotary_factor 0.25 -> rotary dim 8 -> mrope_section sums to 4.
        text_base.update(
            {
                "head_dim": 32,
                "layer_types": ["linear_attention", "full_attention"],
                "linear_key_head_dim": 16,
                "linear_value_head_dim": 16,
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "linear_conv_kernel_dim": 4,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [2, 1, 1],
                    "mrope_interleaved": True,
                },
            }
        )
        vision_base = {**_tiny_qwen_vision(hidden), "num_position_embeddings": 64}
    else:  # pragma: no cover - guarded by the caller
        raise AssertionError(family)
    text_cfg = _merge(text_base, text)
    vision_cfg = _merge(vision_base, vision)
    config = AutoConfig.for_model(
        family, text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=False, **_qwen_vision_ids(tok)
    )
    patch = vision_cfg["patch_size"]
    merge = vision_cfg["spatial_merge_size"]
    proc_cls = IMAGE_ONLY_PROCESSORS[family]
    processor = proc_cls(
        image_processor=_qwen_image_processor(patch, merge), tokenizer=tok, chat_template=tok.chat_template
    )
    return config, processor


def _llama_text(tok, hidden: int, text: dict | None) -> dict[str, Any]:
    return _merge(
        {
            "model_type": "llama",
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            **_token_ids(tok),
        },
        text,
    )


def _build_idefics3(family: str, tok, text: dict | None, vision: dict | None):
    """Idefics3 / SmolVLM: SigLIP-style tower, pixel-shuffle connector, Llama text model.

    Images are resized to a 112 px longest edge and split into 56 px tiles (+ a global view);
    each tile is 4x4 patches of 14 px -> 4 tokens after the 2x pixel shuffle.
    """
    from transformers import AutoConfig, Idefics3ImageProcessorPil, Idefics3Processor, SmolVLMImageProcessorPil

    hidden = (text or {}).get("hidden_size", 64)
    vision_cfg = _merge(
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        vision,
    )
    scale = 2
    config = AutoConfig.for_model(
        family,
        text_config=_llama_text(tok, hidden, text),
        vision_config=vision_cfg,
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    tile = vision_cfg["image_size"]
    seq_len = (tile // vision_cfg["patch_size"]) ** 2 // scale**2
    image_kwargs = {"size": {"longest_edge": 2 * tile}, "max_image_size": {"longest_edge": tile}}
    if family == "smolvlm":
        image_processor = SmolVLMImageProcessorPil(**image_kwargs)
        proc_cls = IMAGE_ONLY_PROCESSORS["smolvlm"]
    else:
        image_processor = Idefics3ImageProcessorPil(**image_kwargs)
        proc_cls = Idefics3Processor
    processor = proc_cls(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len, chat_template=tok.chat_template
    )
    return config, processor


def _build_llava_onevision(family: str, tok, text: dict | None, vision: dict | None):
    """LLaVA-OneVision: SigLIP tower, anyres tiling (28 px tiles, up to 2x2), Qwen2 text model."""
    from transformers import AutoConfig, LlavaOnevisionImageProcessorPil

    hidden = (text or {}).get("hidden_size", 64)
    vision_cfg = _merge(
        {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        vision,
    )
    text_cfg = _merge(
        {
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            **_token_ids(tok),
        },
        text,
    )
    tile = vision_cfg["image_size"]
    pinpoints = [[tile * i, tile * j] for i in (1, 2) for j in (1, 2)]
    config = AutoConfig.for_model(
        family,
        text_config=text_cfg,
        vision_config=vision_cfg,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    proc_cls = IMAGE_ONLY_PROCESSORS["llava_onevision"]
    processor = proc_cls(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=(tile // vision_cfg["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=tok.chat_template,
    )
    return config, processor


def _build_gemma3(family: str, tok, text: dict | None, vision: dict | None):
    """Gemma 3: SigLIP tower (56 px, 4x4 patches) avg-pooled to 4 soft tokens, Gemma 3 text model."""
    from transformers import AutoConfig, Gemma3ImageProcessorPil, Gemma3Processor

    hidden = (text or {}).get("hidden_size", 64)
    text_cfg = _merge(
        {
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 64,
            "max_position_embeddings": 4096,
            **_token_ids(tok),
        },
        text,
    )
    vision_cfg = _merge(
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        vision,
    )
    tokens = 4
    config = AutoConfig.for_model(
        family,
        text_config=text_cfg,
        vision_config=vision_cfg,
        mm_tokens_per_image=tokens,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    size = vision_cfg["image_size"]
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_length=tokens, chat_template=tok.chat_template
    )
    return config, processor


_BUILDERS = {
    "qwen2_vl": _build_qwen,
    "qwen2_5_vl": _build_qwen,
    "qwen3_vl": _build_qwen,
    "qwen3_5": _build_qwen,
    "idefics3": _build_idefics3,
    "smolvlm": _build_idefics3,
    "llava_onevision": _build_llava_onevision,
    "gemma3": _build_gemma3,
}


def build_tiny_model(
    family: str = "qwen2_vl",
    *,
    seed: int = 0,
    text: dict | None = None,
    vision: dict | None = None,
    tokenizer_corpus: list[str] | None = None,
) -> tuple[Any, ProcessorMixin]:
    """Build a tiny randomly initialised image-text-to-text model and its full processor.

    Args:
        family: one of `FAMILIES`.
        seed: seeds the weight initialisation (the tokenizer is deterministic given its corpus).
        text: overrides for the text config (e.g. ``{"hidden_size": 128, "num_hidden_layers": 4}``).
        vision: overrides for the vision config.
        tokenizer_corpus: strings to train the byte-level BPE tokenizer on (a built-in corpus
            with the toy world's words by default).

    Returns:
        ``(model, processor)``; the model is the family's `*ForConditionalGeneration` in fp32,
        eval mode, on CPU.
    """
    from transformers import AutoModelForImageTextToText

    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    tok = build_tokenizer(tokenizer_corpus, family=family)
    config, processor = _BUILDERS[family](family, tok, text, vision)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    if family == "gemma3":
        # Gemma 3 zero-initialises its vision projection (so images would not matter at all).
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            proj.normal_(0.0, proj.shape[0] ** -0.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
    return model.eval(), processor


def save_tiny(model: Any, processor: ProcessorMixin, directory: str | os.PathLike) -> Path:
    """Save a tiny model (safetensors) and its processor so `vopd.models.load_model(dir)` reloads it.

    The processor is saved under the family's stock class (`vopd.stock_processor`), as checkpoints are.
    """
    from vopd.stock_processor import make_processor_stock

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    make_processor_stock(out)
    return out
