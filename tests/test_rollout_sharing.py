"""Prefill sharing in the rollout engine: one prefill per prompt, exactly `generate`'s samples.

With the same seed, the shared-prefill decoder must draw the same token ids as
`generate(num_return_sequences=n)` and record the same sampler log-probs, with vision tokens
still blocked, EOS handling and greedy decoding unchanged.
"""

from __future__ import annotations

import pytest
import torch
from conftest import with_bias

from vopd.config import RolloutConfig
from vopd.models import build_prompts, vision_token_ids
from vopd.rollout import HFGenerateEngine, eos_token_ids
from vopd.scoring import PREFIX_FAMILIES

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

SHARED = sorted(PREFIX_FAMILIES)
TEXTS = ["What color is the circle?", "Hi"]


def _both(model, processor, batch, cfg, seed):
    shared = HFGenerateEngine(processor).sample(model, batch, cfg, generator_seed=seed)
    plain = HFGenerateEngine(processor, share_prefill=False).sample(model, batch, cfg, generator_seed=seed)
    return shared, plain


def _assert_same(shared, plain):
    assert torch.equal(shared.response_ids_B_T, plain.response_ids_B_T)
    assert torch.equal(shared.mask_B_T, plain.mask_B_T)
    assert torch.equal(shared.prompt_index_B, plain.prompt_index_B)
    # fp32 logits/log-probs of size <= ~6 (log V) through ~70 sqrt-units of reductions (2 layers: sequence,
    # hidden, MLP; tests/support/tolerance.py): another order moves them by ~70 * 2**-24 * 6 ~ 3e-6. Shared vs
    # per-row prefill reorders the attention sums, hence atol 1e-5.
    torch.testing.assert_close(shared.sampler_logp_B_T, plain.sampler_logp_B_T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", SHARED)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_shared_prefill_samples_exactly_what_generate_samples(tiny_models, tiny_images, family, temperature, top_p):
    model, processor = tiny_models(family)
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    cfg = RolloutConfig(n=3, temperature=temperature, top_p=top_p, max_new_tokens=12)
    shared, plain = _both(model, processor, batch, cfg, seed=5)
    assert shared.response_ids_B_T.shape == (6, 12)
    assert len({tuple(r.tolist()) for r in shared.response_ids_B_T}) > 1  # real samples, not copies
    _assert_same(shared, plain)


@pytest.mark.parametrize("family", SHARED)
def test_shared_prefill_eos_and_vision_blocking(tiny_models, tiny_images, family):
    """Vision ids made very likely stay blocked; a likely EOS ends rows at different steps."""
    model, processor = tiny_models(family)
    blocked, eos = vision_token_ids(processor, model), eos_token_ids(processor, model)
    biased = with_bias(model, {i: 30.0 for i in blocked} | {eos[0]: 2.5})
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    cfg = RolloutConfig(n=4, max_new_tokens=15)
    shared, plain = _both(biased, processor, batch, cfg, seed=1)
    _assert_same(shared, plain)
    lengths = shared.lengths_B
    assert lengths.min() < lengths.max()  # rows stop at different steps, finished rows are padded
    assert not torch.isin(shared.response_ids_B_T, torch.tensor(blocked)).any()
    # Everything ended early: both paths stop at the same (shorter) width.
    short = with_bias(model, {eos[0]: 8.0})
    shared, plain = _both(short, processor, batch, cfg, seed=2)
    _assert_same(shared, plain)
    assert shared.response_ids_B_T.shape[1] < cfg.max_new_tokens


def test_shared_prefill_greedy_equals_generate(tiny_qwen2_vl, tiny_images):
    model, processor = tiny_qwen2_vl
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    shared, plain = _both(model, processor, batch, RolloutConfig(n=2, temperature=0.0, max_new_tokens=8), seed=0)
    _assert_same(shared, plain)


def test_prompt_decoded_once_per_prompt_and_fallback_families(tiny_models, tiny_images):
    """The decoder's prefill holds P rows (generate's holds P * n); unverified families use generate."""
    model, processor = tiny_models("qwen2_vl")
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    P, L = batch["input_ids"].shape
    rows = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        for share in (True, False):
            HFGenerateEngine(processor, share_prefill=share).sample(
                model, batch, RolloutConfig(n=4, max_new_tokens=3), generator_seed=0
            )
    finally:
        hook.remove()
    assert rows[0] == (P, L) and rows[1:3] == [(4 * P, 1)] * 2  # shared: one P-row prefill, then 1-token steps
    assert rows[3] == (4 * P, L)  # generate: the prompt decoded n times
    assert "qwen3_5" not in PREFIX_FAMILIES and "idefics3" not in PREFIX_FAMILIES
