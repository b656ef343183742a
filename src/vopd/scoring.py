"""What a model scores: n responses per prompt, without repeating the prompt (docs/method.md, "Memory").

Every prompt of a step is followed by ``n`` sampled responses. The straightforward computation
(`repeat_prompts` + `append_responses` + `response_hidden_states`) copies each prompt n times: the
image is encoded n times and the long prompt runs through the decoder n times. Two exact shortcuts:

- ``"image"``: encode each image once (vision tower on P images, not P*n) and hand the features,
  repeated per rollout, to the decoder through the model's ``mm_encoder_outputs`` argument.
- ``"prefix"``: run the P prompts through the decoder once (with gradient when the caller wants
  one), expand their key/value cache to P*n rows, then run only the response tokens against it.
  The hidden state that predicts response token 0 is the prompt's last one; tokens 1..T-1 come
  from the response pass. Autograd flows through the repeated cache, so gradients equal the
  straightforward ones (tests/test_scoring.py checks loss and gradients).

Both are specific to model families whose forward accepts precomputed per-image features as a
tuple and whose decoder uses a plain key/value cache (the Qwen-VL families listed below); any
other model, gradient checkpointing (which drops the cache in training) or ``mode="none"`` takes
the straightforward path. `SharedPrompts` carries the choice, so the student and the teacher
score the same responses the same way.

This module is the one place that knows which families share a prompt: `PREFIX_FAMILIES` also
decides where `vopd.rollout` decodes n samples from one prefill, through the same
`prefill_prompts` / `text_positions` (M-RoPE positions of the text after a prompt).

What a model scores is a `ScoredBatch`: `SharedPrompts`, `NaiveInputs` (``naive=true``) or
`FullInputs` (an already assembled prompt + response batch); each gives
``response_hidden_states(model)``.

Axis suffixes: P prompts, B = P * n rows, L prompt length, T response tokens, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vopd.models import append_responses, backbone, repeat_prompts, response_hidden_states

__all__ = [
    "MODES",
    "SharedPrompts",
    "NaiveInputs",
    "FullInputs",
    "ScoredBatch",
    "ResponseHidden",
    "sharing_mode",
    "PREFIX_FAMILIES",
    "IMAGE_FAMILIES",
    "Prefill",
    "prefill_prompts",
    "text_positions",
]

MODES = ("prefix", "image", "none")

# model_type -> prompt computed once for its n rows: verified for scoring by tests/test_scoring.py
# (same hidden states and gradients as the straightforward computation) and for sampling by
# tests/test_rollout_sharing.py (same tokens and log-probs as generate()). Qwen3.5 (hybrid
# linear-attention layers, whose recurrent cache is not a key/value cache) is not verified for
# prefix sharing; it gets the image shortcut.
PREFIX_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})
IMAGE_FAMILIES = PREFIX_FAMILIES | {"qwen3_5"}


def sharing_mode(model: nn.Module, requested: str = "prefix") -> str:
    """The best sharing mode this model supports, at most ``requested`` (prefix > image > none)."""
    if requested not in MODES:
        raise ValueError(f"sharing mode must be one of {MODES}, got {requested!r}")
    model_type = getattr(model.config, "model_type", None)
    # Gradient checkpointing drops the key/value cache in training forwards (transformers warns and
    # sets cache=None), which would silently break prefix sharing.
    flag = (
        "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    )
    checkpointing = bool(getattr(model, flag, False))
    if requested == "prefix" and model_type in PREFIX_FAMILIES and not checkpointing:
        return "prefix"
    if requested in ("prefix", "image") and model_type in IMAGE_FAMILIES:
        return "image"
    return "none"


@dataclass
class SharedPrompts:
    """P prompts and their P*n responses (prompt-major), scored with the prompt computed once.

    ``mode`` is the *requested* sharing; each model gets ``sharing_mode(model, mode)``, so a
    family without support falls back to the straightforward path. Pass the object where a
    teacher expects ``inputs``: `response_hidden_states(model)` is what it calls.
    """

    prompts: Any  # BatchFeature, left-padded, one row per prompt
    response_ids_B_T: Tensor
    mask_B_T: Tensor
    n: int
    mode: str = "prefix"

    @property
    def num_response_tokens(self) -> int:
        return self.response_ids_B_T.shape[1]

    def full_inputs(self) -> dict[str, Any]:
        """The straightforward batch: every prompt repeated n times, responses appended."""
        return append_responses(repeat_prompts(self.prompts, self.n), self.response_ids_B_T, self.mask_B_T)

    def response_hidden_states(self, model: nn.Module) -> Tensor:
        """[B, T, H] final hidden states predicting each response token (as `models.response_hidden_states`)."""
        mode = sharing_mode(model, self.mode)
        if mode == "prefix":
            return _prefix_shared_hidden(model, self)
        if mode == "image":
            return _image_shared_hidden(model, self)
        return response_hidden_states(model, self.full_inputs(), self.num_response_tokens)


@dataclass
class NaiveInputs:
    """The straightforward batch scored the way the released code does: with vocabulary logits at
    every position (prompt included) from the model's own forward, then cut to the responses.

    Exists only for ``naive=true``, to measure what the shortcuts save; same numbers, more work.
    """

    inputs: dict[str, Any]
    num_response_tokens: int

    def response_logits(self, model: nn.Module) -> Tensor:
        """[B, T, V] logits predicting the response tokens, from the model's full forward."""
        start = self.inputs["input_ids"].shape[1] - self.num_response_tokens - 1
        return model(**self.inputs, use_cache=False).logits[:, start : start + self.num_response_tokens]

    def response_hidden_states(self, model: nn.Module) -> Tensor:
        captured: list[Tensor] = []
        hook = backbone(model).register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
        try:
            model(**self.inputs, use_cache=False)  # computes (and drops) [B, L+T, V] logits
        finally:
            hook.remove()
        total, T = self.inputs["input_ids"].shape[1], self.num_response_tokens
        return captured[-1][:, total - T - 1 : total - 1]


@dataclass
class FullInputs:
    """An assembled prompt + response batch (`vopd.models.append_responses`), scored straightforwardly."""

    inputs: dict[str, Any]
    num_response_tokens: int

    def response_hidden_states(self, model: nn.Module) -> Tensor:
        return response_hidden_states(model, self.inputs, self.num_response_tokens)


ScoredBatch = SharedPrompts | NaiveInputs | FullInputs


def _image_order(prompts: Any, n: int) -> list[int]:
    """Source image of each image slot of the P*n rows, prompt-major: rows i*n..i*n+n-1 each take
    prompt i's images, in order. A prompt may hold several images (repeating image-major would hand
    row 0 two copies of prompt 0's first image)."""
    grid = prompts["image_grid_thw"]
    num_prompts, num_images = prompts["input_ids"].shape[0], grid.shape[0]
    types_P_L = prompts.get("mm_token_type_ids")
    if types_P_L is None:
        if num_images != num_prompts:
            raise ValueError(
                f"{num_images} images for {num_prompts} prompts and no mm_token_type_ids to "
                "tell which image belongs to which prompt; use sharing mode 'prefix' or 'none'"
            )
        per_prompt = [1] * num_prompts
    else:
        # Each image is one contiguous run of image tokens (type 1) in its prompt row.
        is_image_P_L = types_P_L == 1
        starts_P_L = is_image_P_L.clone()
        starts_P_L[:, 1:] &= ~is_image_P_L[:, :-1]
        per_prompt = starts_P_L.sum(dim=1).tolist()
        if sum(per_prompt) != num_images:
            raise ValueError(
                f"the prompts hold {sum(per_prompt)} image-token runs but image_grid_thw has "
                f"{num_images} rows; use sharing mode 'prefix' or 'none'"
            )
    order, first = [], 0
    for count in per_prompt:
        order += list(range(first, first + count)) * n
        first += count
    return order


def _repeat_per_image(value: Any, order: list[int]) -> Any:
    """Per-image features reordered to ``order``: a tuple of per-image tensors, or lists of them."""
    if isinstance(value, tuple) and all(isinstance(v, Tensor) for v in value):
        return tuple(value[i] for i in order)
    if isinstance(value, list):
        return [_repeat_per_image(v, order) for v in value]
    raise TypeError(f"unexpected image-feature layout {type(value).__name__}; use sharing mode 'none'")


def _encode_images_once(backbone: nn.Module, prompts: Any, order: list[int]) -> dict[str, Any]:
    """Vision tower on the P prompts' images; features handed to the P*n rows that use them."""
    features = backbone.get_image_features(prompts["pixel_values"], prompts["image_grid_thw"], return_dict=True)
    features.pooler_output = _repeat_per_image(features.pooler_output, order)
    if getattr(features, "deepstack_features", None) is not None:  # Qwen3-VL: features for inner layers too
        features.deepstack_features = _repeat_per_image(features.deepstack_features, order)
    return {"image": features}


def _image_shared_hidden(model: nn.Module, shared: SharedPrompts) -> Tensor:
    base, prompts, n = backbone(model), shared.prompts, shared.n
    text_only = {k: v for k, v in prompts.items() if k not in ("pixel_values", "image_grid_thw")}
    inputs = append_responses(repeat_prompts(text_only, n), shared.response_ids_B_T, shared.mask_B_T)
    order = _image_order(prompts, n)
    inputs["image_grid_thw"] = prompts["image_grid_thw"][order]  # for M-RoPE positions
    inputs["mm_encoder_outputs"] = _encode_images_once(base, prompts, order)
    total, T = inputs["input_ids"].shape[1], shared.num_response_tokens
    out = base(**inputs, use_cache=False, return_dict=True)
    return out.last_hidden_state[:, total - T - 1 : total - 1]


@dataclass
class Prefill:
    """P prompts run through the decoder once: their hidden states, key/value cache and next positions."""

    hidden_P_L_H: Tensor  # final hidden states of the prompt tokens
    cache: Any  # transformers DynamicCache over the P prompts
    next_pos_P: Tensor  # M-RoPE position of the first token after each prompt (same on all three axes)

    def repeat(self, n: int) -> Tensor:
        """Expand the cache to P*n rows (prompt-major, in place); returns the P*n next positions.

        Differentiable: gradients of all n rows sum into the prompt's keys and values."""
        self.cache.batch_repeat_interleave(n)
        return self.next_pos_P.repeat_interleave(n)


def prefill_prompts(base: nn.Module, prompts: Any) -> Prefill:
    """Run left-padded prompts through ``base`` (the backbone, `vopd.models.backbone`) with a cache.

    M-RoPE positions of the prompt come from the model's own rule; text after the prompt continues
    from the prompt's largest position + 1 on all three axes (left padding keeps columns aligned).
    """
    from transformers import DynamicCache

    pos_3_P_L = base.compute_3d_position_ids(
        input_ids=prompts["input_ids"],
        inputs_embeds=None,
        image_grid_thw=prompts.get("image_grid_thw"),
        video_grid_thw=prompts.get("video_grid_thw"),
        attention_mask=prompts["attention_mask"],
        cache=None,
        mm_token_type_ids=prompts.get("mm_token_type_ids"),
    )
    cache = DynamicCache(config=base.config.get_text_config())
    out = base(**prompts, position_ids=pos_3_P_L, cache=cache, use_cache=True, return_dict=True)
    return Prefill(out.last_hidden_state, getattr(out, "cache", None) or cache, pos_3_P_L.amax(dim=(0, 2)) + 1)


def text_positions(next_pos_B: Tensor, offset: int, count: int) -> Tensor:
    """[3, B, count] M-RoPE positions of ``count`` text tokens starting ``offset`` after each prompt."""
    steps = torch.arange(offset, offset + count, device=next_pos_B.device)
    return (next_pos_B[:, None] + steps[None, :]).unsqueeze(0).expand(3, -1, -1)


def _prefix_shared_hidden(model: nn.Module, shared: SharedPrompts) -> Tensor:
    base, prompts, n = backbone(model), shared.prompts, shared.n
    ids_B_T, T = shared.response_ids_B_T, shared.num_response_tokens
    prefill = prefill_prompts(base, prompts)
    first_B_1_H = prefill.hidden_P_L_H[:, -1:].repeat_interleave(n, dim=0)
    if T == 1:
        return first_B_1_H
    next_pos_B = prefill.repeat(n)
    prompt_mask_P_L = prompts["attention_mask"]
    mask_B_LT = torch.cat(
        [prompt_mask_P_L.repeat_interleave(n, dim=0), shared.mask_B_T[:, : T - 1].to(prompt_mask_P_L.dtype)], dim=1
    )
    rest = base(
        input_ids=ids_B_T[:, : T - 1].to(prompts["input_ids"].dtype),
        attention_mask=mask_B_LT,
        position_ids=text_positions(next_pos_B, 0, T - 1),
        cache=prefill.cache,
        use_cache=True,
        return_dict=True,
    )
    return torch.cat([first_B_1_H, rest.last_hidden_state], dim=1)


class ResponseHidden(nn.Module):
    """Wraps the policy so the student forward goes through ``accelerate``/DDP's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: ScoredBatch, *, all_logits: bool = False) -> Tensor:
        """[B, T, H] hidden states predicting the responses; with ``all_logits`` (a `NaiveInputs`
        batch, naive mode) [B, T, V] logits from the model's full forward, as the released code does."""
        if all_logits:
            if not isinstance(batch, NaiveInputs):
                raise TypeError(f"all_logits needs a NaiveInputs batch, got {type(batch).__name__}")
            return batch.response_logits(self.model)
        return batch.response_hidden_states(self.model)
