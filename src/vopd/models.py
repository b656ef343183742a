"""The model adapter: load a Hugging Face image-text-to-text model, build prompt batches, score responses.

Model-family agnostic; tested on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Idefics3 / SmolVLM,
LLaVA-OneVision and Gemma 3. The core contract used by rollouts and the trainer:

1. `build_prompts(processor, images, texts)` -> a LEFT-padded prompt batch (all prompts end at
   the same column), with whatever side inputs the family needs (pixel_values, image_grid_thw,
   mm_token_type_ids, token_type_ids, pixel_attention_mask, image_sizes, ...).
2. `repeat_prompts(batch, n)` -> each prompt row repeated n times, prompt-major.
3. `append_responses(batch, response_ids_B_T, mask_B_T)` -> prompt + response inputs.
4. `response_hidden_states(model, inputs, T)` -> [B, T, H] hidden states at the positions that
   predict the T response tokens, without computing vocabulary logits for prompt tokens;
   `output_head(model)` maps them to logits.

The student (full image) and the teacher (crop) get different prompt batches but the same
response ids, so their [B, T, ...] outputs align position by position.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from vopd.processors import register_image_only_processors  # importing registers them with AutoProcessor

__all__ = [
    "load_model",
    "load_processor",
    "chat_prompt",
    "vision_token_ids",
    "build_prompts",
    "repeat_prompts",
    "append_responses",
    "response_hidden_states",
    "output_head",
    "linear_head",
    "LinearHead",
    "apply_softcap",
    "logit_softcap",
    "backbone",
    "response_logits",
    "PER_TOKEN_KEYS",
]

# Per-token side inputs: same [B, L] layout as input_ids; response tokens are plain text (0).
PER_TOKEN_KEYS: tuple[str, ...] = ("mm_token_type_ids", "token_type_ids")

# model_type -> image-only processor family, for checkpoints whose stock processor needs a
# video processor (torchvision) that is not installed.
_IMAGE_ONLY_FALLBACK = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "llava_onevision": "llava_onevision",
    "smolvlm": "smolvlm",
}

# Token strings that mark vision inputs in the families we know; looked up in the vocabulary.
_VISION_TOKEN_STRINGS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<image>",
    "<video>",
    "<fake_token_around_image>",
    "<global-img>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
# Processor / config attributes that hold vision token ids.
_VISION_ID_ATTRS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "fake_image_token_id",
    "global_image_token_id",
    "image_token_index",
    "video_token_index",
    "boi_token_id",
    "eoi_token_id",
    "boi_token_index",
    "eoi_token_index",
)

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# ----------------------------------------------------------------------------------------------
# Loading


def load_model(
    path: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load an image-text-to-text model and its processor from a hub id or a local directory.

    Returns ``(model, processor)`` with the model in eval mode on `device`. Raises
    FileNotFoundError for a local path that does not exist and ValueError for a checkpoint that
    is not an image-text-to-text model or whose processor cannot handle images.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    _check_local_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise OSError(
            f"{path}: cannot read the model config ({exc}). Offline (HF_HUB_OFFLINE=1) only cached hub ids "
            "and local directories work."
        ) from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not trust_remote_code:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not an image-text-to-text (vision-language) model; "
            "vopd needs a checkpoint that AutoModelForImageTextToText can load (e.g. Qwen3.5, Qwen2.5-VL)."
        )
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = _load_processor(path, model_type, trust_remote_code)
    return model.to(device).eval(), processor


def build_empty_model(
    path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The model of a local checkpoint folder with its parameters on the meta device (no memory, no
    weights read): buffers such as rotary frequencies are real. For sharded loading
    (`vopd.parallel.load_sharded`), which fills each rank's shards from the files afterwards."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, **kwargs)
    if (Path(path) / "generation_config.json").is_file():  # as from_pretrained would
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def load_processor(path: str, *, trust_remote_code: bool = False) -> ProcessorMixin:
    """The processor of a hub id or local checkpoint folder, without loading the weights.

    The one processor loader of vopd (`load_model` uses it too): the stock class when it loads
    with an image processor, else the family's image-only class (`vopd.processors`, with a
    warning), e.g. for a vopd checkpoint, whose config names the stock class, without torchvision.
    """
    from transformers import AutoConfig

    _check_local_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise OSError(f"{path}: cannot read the model config ({exc})") from exc
    return _load_processor(path, getattr(config, "model_type", None), trust_remote_code)


def _check_local_path(path: str) -> None:
    """Fail early, naming the path, when a local directory is meant but missing."""
    if Path(path).expanduser().exists():
        return
    if path.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(path):
        raise FileNotFoundError(
            f"model path {path!r} does not exist; pass a local directory with config.json or a hub id "
            "like 'Qwen/Qwen3.5-4B'"
        )


def _load_processor(path: str, model_type: str | None, trust_remote_code: bool) -> ProcessorMixin:
    from transformers import AutoProcessor

    error: Exception | None = None
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError) as exc:  # e.g. a video processor needing torchvision
        processor, error = None, exc
    if _has_image_processor(processor):
        return processor
    family = _IMAGE_ONLY_FALLBACK.get(model_type or "")
    if family is not None:
        image_only = register_image_only_processors()[family]
        processor = image_only.from_pretrained(path)
        if _has_image_processor(processor):
            if error is not None:  # the stock class failed (typically: no torchvision for its video processor)
                warnings.warn(
                    f"{path}: the stock processor could not load ({type(error).__name__}: "
                    f"{str(error).strip().split('. ')[0]}); using vopd's "
                    f"{image_only.__name__} (images only, no video processor)",
                    stacklevel=3,
                )
            return processor
    raise ValueError(
        f"{path}: could not load a processor with an image processor (got {type(processor).__name__}). "
        "Check that preprocessor_config.json / processor_config.json exist"
        + (f"; the loader said: {error}" if error else "")
    )


def _has_image_processor(processor: Any) -> bool:
    return isinstance(processor, ProcessorMixin) and getattr(processor, "image_processor", None) is not None


# ----------------------------------------------------------------------------------------------
# Prompts


def _tokenizer(processor: Any):
    return getattr(processor, "tokenizer", processor)


def chat_prompt(processor: ProcessorMixin, text: str, *, thinking: bool | None = None) -> str:
    """One user turn (one image, then `text`) rendered with the chat template, generation prompt added.

    `thinking=None` selects the non-thinking mode (``enable_thinking=False``) when the template
    knows that switch (Qwen3.5, Qwen3); `True`/`False` pass it explicitly.
    """
    template = getattr(processor, "chat_template", None) or getattr(_tokenizer(processor), "chat_template", None)
    if not template:
        raise ValueError(f"{type(processor).__name__} has no chat template; set processor.chat_template")
    kwargs: dict[str, Any] = {}
    if "enable_thinking" in str(template):  # other templates have no such switch: pass nothing
        kwargs["enable_thinking"] = bool(thinking)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def vision_token_ids(processor: ProcessorMixin, model: PreTrainedModel | None = None) -> list[int]:
    """Ids of every vision special token (image/video pads, vision start/end, boi/eoi, tile tags).

    These must never be sampled: a sampled image pad token makes the next forward fail with an
    image-features / image-tokens mismatch. Collected from the processor, the tokenizer's
    vocabulary and (if given) the model config; sorted, unique.
    """
    tok = _tokenizer(processor)
    vocab = tok.get_vocab()
    ids: set[int] = {vocab[s] for s in _VISION_TOKEN_STRINGS if s in vocab}
    ids.update(i for s, i in vocab.items() if s.startswith("<row_") and s.endswith(">") and "_col_" in s)
    sources: list[Any] = [processor, tok]
    if model is not None:
        sources += [model.config, getattr(model.config, "text_config", None)]
    for source in sources:
        for attr in _VISION_ID_ATTRS:
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int) and value >= 0:
                ids.add(value)
        ids.update(int(i) for i in getattr(source, "row_col_ids", None) or [] if isinstance(i, int) and i >= 0)
    return sorted(ids)


def build_prompts(
    processor: ProcessorMixin,
    images: Sequence[Image.Image],
    texts: Sequence[str],
    *,
    thinking: bool | None = None,
    max_prompt_tokens: int | None = None,
) -> BatchFeature:
    """Tokenise one (image, text) user turn per row into a LEFT-padded prompt batch.

    Returns the processor's BatchFeature (input_ids, attention_mask and the family's vision
    inputs), left-padded so every prompt ends at the last column. Raises ValueError when the
    lengths differ or a row is longer than `max_prompt_tokens` (rows are never truncated).
    """
    if len(images) != len(texts):
        raise ValueError(f"build_prompts: {len(images)} images but {len(texts)} texts; pass one image per text")
    if not texts:
        raise ValueError("build_prompts: empty batch")
    prompts = [chat_prompt(processor, t, thinking=thinking) for t in texts]
    tok = _tokenizer(processor)
    old_side = tok.padding_side
    tok.padding_side = "left"  # some processors ignore a padding_side kwarg
    try:
        batch = processor(
            images=[[img.convert("RGB")] for img in images],
            text=prompts,
            padding=True,
            return_tensors="pt",
        )
    finally:
        tok.padding_side = old_side
    mask = batch["attention_mask"]
    if not bool(mask[:, -1].all()):
        raise RuntimeError(f"{type(processor).__name__} did not left-pad the prompt batch")
    if max_prompt_tokens is not None:
        lengths = mask.sum(dim=1)
        too_long = (lengths > max_prompt_tokens).nonzero().flatten().tolist()
        if too_long:
            row = too_long[0]
            raise ValueError(
                f"prompt row {row} has {int(lengths[row])} tokens, over max_prompt_tokens={max_prompt_tokens} "
                f"({len(too_long)} row(s) too long); shrink the image (the processor's max_pixels) or the text, "
                "or raise the limit"
            )
    return batch


def repeat_prompts(prompt_batch: BatchFeature | dict, n: int) -> BatchFeature:
    """Repeat each prompt row `n` times, prompt-major: rows i*n .. i*n+n-1 are copies of prompt i.

    Handles Qwen's flattened vision layout (pixel_values [sum_patches, D] split by
    image_grid_thw, one image per row) and per-row layouts (pixel_values [B, ...]).
    """
    if n < 1:
        raise ValueError(f"repeat_prompts: n must be >= 1, got {n}")
    batch_size = prompt_batch["input_ids"].shape[0]
    out: dict[str, Any] = {}
    for key, value in prompt_batch.items():
        if key in ("pixel_values", "image_grid_thw") and "image_grid_thw" in prompt_batch:
            continue
        out[key] = _repeat_rows(key, value, batch_size, n)
    if "image_grid_thw" in prompt_batch:
        grid = prompt_batch["image_grid_thw"]
        if grid.shape[0] != batch_size:
            raise ValueError(
                f"repeat_prompts: {grid.shape[0]} images for {batch_size} prompts; expected one image per prompt"
            )
        chunks = prompt_batch["pixel_values"].split(grid.prod(dim=1).tolist(), dim=0)
        out["pixel_values"] = torch.cat([c for c in chunks for _ in range(n)], dim=0)
        out["image_grid_thw"] = grid.repeat_interleave(n, dim=0)
    return BatchFeature(out)


def _repeat_rows(key: str, value: Any, batch_size: int, n: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != batch_size:
            raise ValueError(
                f"repeat_prompts: don't know how to repeat {key!r} of shape {tuple(value.shape)} for "
                f"{batch_size} prompts"
            )
        return value.repeat_interleave(n, dim=0)
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        return [v for v in value for _ in range(n)]
    return value


def append_responses(
    prompt_batch: BatchFeature | dict,
    response_ids_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
) -> dict[str, Any]:
    """Concatenate responses to the right of left-padded prompts (rows must already match).

    attention_mask is extended with the response mask; per-token side inputs
    (mm_token_type_ids, token_type_ids) with zeros (text); everything else is passed through.
    """
    input_ids = prompt_batch["input_ids"]
    if response_ids_B_T.shape[0] != input_ids.shape[0] or response_mask_B_T.shape != response_ids_B_T.shape:
        raise ValueError(
            f"append_responses: prompt batch has {input_ids.shape[0]} rows, responses "
            f"{tuple(response_ids_B_T.shape)} with mask {tuple(response_mask_B_T.shape)}; "
            "repeat the prompts (repeat_prompts) so each response row has its prompt row"
        )
    response_ids_B_T = response_ids_B_T.to(input_ids.device, input_ids.dtype)
    out = dict(prompt_batch)
    out["input_ids"] = torch.cat([input_ids, response_ids_B_T], dim=1)
    mask = prompt_batch["attention_mask"]
    out["attention_mask"] = torch.cat([mask, response_mask_B_T.to(mask.device, mask.dtype)], dim=1)
    for key in PER_TOKEN_KEYS:
        if key in prompt_batch:
            side = prompt_batch[key]
            out[key] = torch.cat([side, side.new_zeros(response_ids_B_T.shape)], dim=1)
    return out


# ----------------------------------------------------------------------------------------------
# Scoring


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The base model under the LM head (``model.<base_model_prefix>``): final hidden states, no logits."""
    found = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if found is None or found is model:
        raise ValueError(f"{type(model).__name__}: cannot find the base model (model.{model.base_model_prefix})")
    return found


def response_hidden_states(model: PreTrainedModel, inputs: dict[str, Any], num_response_tokens: int) -> torch.Tensor:
    """Final hidden states [B, T, H] at the positions that predict the T response tokens.

    `inputs` is `append_responses(...)` output (prompt length P, T response tokens at the end);
    position P-1+t predicts response token t, so columns P-1 .. P+T-2 are returned. Runs the
    backbone only (after its final norm), so no vocabulary logits are made for prompt tokens;
    rope / M-RoPE positions come from the model's own logic via the attention mask.
    """
    total = inputs["input_ids"].shape[1]
    if not 0 < num_response_tokens < total:
        raise ValueError(f"num_response_tokens={num_response_tokens} must be in [1, {total - 1}]")
    out = backbone(model)(**inputs, use_cache=False, return_dict=True)
    start = total - num_response_tokens - 1
    return out.last_hidden_state[:, start : start + num_response_tokens]


class LinearHead(NamedTuple):
    """An LM head that is exactly ``nn.Linear``: ``logits = apply_softcap(h W^T + b, softcap)``."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    softcap: float | None


def logit_softcap(model: PreTrainedModel) -> float | None:
    """The final logit soft-cap of the model's config (Gemma-style ``final_logit_softcapping``), or None."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)``; the logits unchanged when ``cap`` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def output_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [..., H] -> logits [..., V]: the LM head plus final logit soft-capping if configured."""
    head, cap = model.get_output_embeddings(), logit_softcap(model)
    return lambda hidden: apply_softcap(head(hidden), cap)


def linear_head(model: PreTrainedModel) -> LinearHead | None:
    """The LM head as a `LinearHead` when it is exactly ``nn.Linear`` (the fused loss needs one), else None."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    return LinearHead(head.weight, head.bias, logit_softcap(model))


def response_logits(model: PreTrainedModel, inputs: dict[str, Any], num_response_tokens: int) -> torch.Tensor:
    """Logits [B, T, V] predicting the T response tokens (see `response_hidden_states`)."""
    return output_head(model)(response_hidden_states(model, inputs, num_response_tokens))
