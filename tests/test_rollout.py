"""On-policy rollouts: vision tokens blocked, EOS / masks, sampler log-probs, prompt-major rows."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import with_bias
from support.reference import teacher_forced_logp

from vopd.config import RolloutConfig
from vopd.models import append_responses, build_prompts, repeat_prompts, response_logits, vision_token_ids
from vopd.rollout import (
    BlockTokens,
    HFGenerateEngine,
    block_vision_tokens,
    eos_token_ids,
    response_mask,
)
from vopd.tiny_models import FAMILIES as ALL_FAMILIES

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

FAMILIES = list(ALL_FAMILIES)
TEXTS = ["What color is the circle?", "Hi"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tokens_never_sampled(tiny_models, tiny_images, family):
    model, processor = tiny_models(family)
    blocked = vision_token_ids(processor, model)
    eos = eos_token_ids(processor, model)
    # Vision tokens get +30 on every logit: without the blocker nearly every sample is one.
    biased = with_bias(model, {i: 30.0 for i in blocked} | {i: -30.0 for i in eos})
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    cfg = RolloutConfig(n=4, temperature=1.0, max_new_tokens=40)
    unblocked = HFGenerateEngine([]).sample(biased, batch, cfg, generator_seed=0)
    share = torch.isin(unblocked.response_ids_B_T, torch.tensor(blocked)).float().mean()
    assert share > 0.9
    rollouts = HFGenerateEngine(processor).sample(biased, batch, cfg, generator_seed=0)
    assert rollouts.response_ids_B_T.shape == (8, 40)
    assert not torch.isin(rollouts.response_ids_B_T, torch.tensor(blocked)).any()
    assert torch.isfinite(rollouts.sampler_logp_B_T).all()


def test_block_tokens_processor():
    proc = BlockTokens([1, 3, 99])  # 99 is outside this vocab and ignored
    scores = torch.zeros(2, 5)
    out = proc(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.isinf(out[:, [1, 3]]).all() and (out[:, [0, 2, 4]] == 0).all()
    assert (scores == 0).all()  # input not modified in place


def test_block_vision_tokens_uses_processor(tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    assert block_vision_tokens(processor, model).ids == vision_token_ids(processor, model)


def test_response_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 5, 5, 5, 5], [5, 0, 5, 5, 0]])
    mask = response_mask(ids, [2, 0])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True, True, True, True, True],
        [True, True, False, False, False],
    ]


def test_eos_ids_include_end_of_turn_and_generation_config(tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    tok = processor.tokenizer
    ids = eos_token_ids(processor, model)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids and tok.convert_tokens_to_ids("<|endoftext|>") in ids
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), 77]
    assert 77 in eos_token_ids(processor, m)


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_masks_and_padding(tiny_models, tiny_images, family):
    model, processor = tiny_models(family)
    eos = eos_token_ids(processor, model)
    pad = processor.tokenizer.pad_token_id
    biased = with_bias(model, {eos[0]: 4.5})  # ends after a few tokens, at varying lengths
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    r = HFGenerateEngine(processor).sample(biased, batch, RolloutConfig(n=8, max_new_tokens=12), generator_seed=3)
    ids, mask = r.response_ids_B_T, r.mask_B_T
    lengths = r.lengths_B
    assert lengths.min() < lengths.max() and lengths.min() >= 1
    for row in range(ids.shape[0]):
        L = int(lengths[row])
        assert mask[row, :L].all() and not mask[row, L:].any()
        is_eos = torch.isin(ids[row], torch.tensor(eos))
        if L < ids.shape[1] or is_eos[L - 1]:
            assert is_eos[L - 1] and not is_eos[: L - 1].any()  # the stopping EOS is inside the mask
        assert (ids[row, L:] == pad).all()
        assert (r.sampler_logp_B_T[row, L:] == 0).all()
    assert mask.dtype == torch.bool and ids.dtype == torch.long


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampler_logp_matches_processed_distribution(tiny_models, tiny_images, family, temperature, top_p):
    model, processor = tiny_models(family)
    blocked = vision_token_ids(processor, model)
    biased = with_bias(model, {i: 3.0 for i in blocked})  # blocking must matter for the normaliser
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    cfg = RolloutConfig(n=3, temperature=temperature, top_p=top_p, max_new_tokens=8)
    r = HFGenerateEngine(processor).sample(biased, batch, cfg, generator_seed=5)
    ref = teacher_forced_logp(biased, batch, r, blocked, temperature=temperature, top_p=top_p)
    # fp32 logits/log-probs of size <= ~6 (log V) through ~70 sqrt-units of reductions (2 layers: sequence,
    # hidden, MLP; tests/support/tolerance.py): another order moves them by ~70 * 2**-24 * 6 ~ 3e-6. Decoding
    # with a KV cache vs one teacher-forced forward (plus top-p renormalising), hence atol 2e-5.
    torch.testing.assert_close(r.sampler_logp_B_T[r.mask_B_T].double(), ref[r.mask_B_T], atol=2e-5, rtol=0)
    assert (r.sampler_logp_B_T <= 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_major_rows_and_greedy(tiny_models, tiny_images, family):
    model, processor = tiny_models(family)
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    engine = HFGenerateEngine(processor)
    greedy = engine.sample(model, batch, RolloutConfig(n=2, temperature=0.0, max_new_tokens=6))
    assert greedy.prompt_index_B.tolist() == [0, 0, 1, 1]
    # Rows of one prompt are identical under greedy decoding and equal that prompt decoded alone.
    assert torch.equal(greedy.response_ids_B_T[0], greedy.response_ids_B_T[1])
    assert torch.equal(greedy.response_ids_B_T[2], greedy.response_ids_B_T[3])
    alone = engine.sample(
        model,
        build_prompts(processor, [tiny_images[1]], [TEXTS[1]]),
        RolloutConfig(n=1, temperature=0.0, max_new_tokens=6),
    )
    L = int(alone.lengths_B[0])
    assert torch.equal(alone.response_ids_B_T[0, :L], greedy.response_ids_B_T[2, :L])
    # Greedy = argmax of the (blocked) teacher-forced logits at every position.
    ref = teacher_forced_logp(model, batch, greedy, vision_token_ids(processor, model))
    inputs = append_responses(repeat_prompts(batch, 2), greedy.response_ids_B_T, greedy.mask_B_T)
    with torch.no_grad():
        logits = response_logits(model, inputs, greedy.response_ids_B_T.shape[1])
    logits[..., vision_token_ids(processor, model)] = float("-inf")
    m = greedy.mask_B_T
    assert torch.equal(logits.argmax(-1)[m], greedy.response_ids_B_T[m])
    # Same bound as above: KV-cache decoding vs one teacher-forced forward, atol 2e-5.
    torch.testing.assert_close(greedy.sampler_logp_B_T[m].double(), ref[m], atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_models, tiny_images, family):
    model, processor = tiny_models(family)
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    engine, cfg = HFGenerateEngine(processor), RolloutConfig(n=3, max_new_tokens=10)
    torch.manual_seed(123)
    a = engine.sample(model, batch, cfg, generator_seed=7)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = engine.sample(model, batch, cfg, generator_seed=7)
    assert torch.equal(a.response_ids_B_T, b.response_ids_B_T) and torch.equal(torch.rand(1), after)
    c = engine.sample(model, batch, cfg, generator_seed=8)
    assert not torch.equal(a.response_ids_B_T, c.response_ids_B_T)
    # Without generator_seed the global torch seed decides.
    torch.manual_seed(11)
    d = engine.sample(model, batch, cfg)
    torch.manual_seed(11)
    e = engine.sample(model, batch, cfg)
    assert torch.equal(d.response_ids_B_T, e.response_ids_B_T)


def test_sampling_does_not_change_training_mode(tiny_qwen2_vl, tiny_images):
    model, processor = tiny_qwen2_vl
    m = copy.deepcopy(model).train()
    HFGenerateEngine(processor).sample(
        m, build_prompts(processor, [tiny_images[0]], TEXTS[:1]), RolloutConfig(n=1, max_new_tokens=2)
    )
    assert m.training


def test_generation_config_defaults_do_not_leak(tiny_qwen2_vl, tiny_images):
    """A checkpoint's top_k / temperature / repetition_penalty must not alter our sampler."""
    model, processor = tiny_qwen2_vl
    m = copy.deepcopy(model)
    m.generation_config.update(top_k=1, temperature=0.01, repetition_penalty=5.0, top_p=0.1, do_sample=True)
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    cfg = RolloutConfig(n=2, max_new_tokens=6)
    a = HFGenerateEngine(processor).sample(m, batch, cfg, generator_seed=1)
    b = HFGenerateEngine(processor).sample(model, batch, cfg, generator_seed=1)
    assert torch.equal(a.response_ids_B_T, b.response_ids_B_T)


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}]
)
def test_rollout_config_validation(kwargs):
    with pytest.raises(ValueError, match=r"rollout\."):
        RolloutConfig(**kwargs)
