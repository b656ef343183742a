"""The sharing shortcuts of vopd.scoring equal the straightforward computation (values and
gradients), do the work they promise (image encoded once, prompt decoded once), and fall back
cleanly; the training step gives the same loss and gradients in every mode, naive included."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from support.tolerance import divergence_atol, logit_error

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec used below
import vopd.train_setup as train_setup
import vopd.trainer as trainer_mod
from vopd.models import build_prompts
from vopd.objectives import LossKnobs
from vopd.scoring import NaiveInputs, SharedPrompts, sharing_mode

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
N, T = 3, 5


def _batch(processor, images):
    """Two prompts of different lengths (left padding), n=3 responses each, ragged masks."""
    prompts = build_prompts(processor, list(images), ["What color is the circle?", "Is it green?"])
    g = torch.Generator().manual_seed(0)
    ids_B_T = torch.randint(20, 200, (2 * N, T), generator=g)
    mask_B_T = torch.ones(2 * N, T, dtype=torch.bool)
    mask_B_T[1, 3:] = False  # response ended early
    mask_B_T[4, 1:] = False  # one-token response
    return prompts, ids_B_T, mask_B_T


def _hidden_and_grads(model, shared, weight):
    model.zero_grad(set_to_none=True)
    hidden_B_T_H = shared.response_hidden_states(model)
    ((hidden_B_T_H * weight)[shared.mask_B_T]).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return hidden_B_T_H.detach()[shared.mask_B_T], grads


@pytest.mark.parametrize("family", QWEN)
def test_sharing_equals_straightforward_values_and_gradients(tiny_models, tiny_images, family):
    model, processor = tiny_models(family)
    model = copy.deepcopy(model).double().train()
    prompts, ids_B_T, mask_B_T = _batch(processor, tiny_images)
    assert prompts["attention_mask"].sum(1).unique().numel() == 2, "prompts must differ in length (padding)"
    weight = torch.randn(
        2 * N,
        T,
        model.config.get_text_config().hidden_size,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    ref_h, ref_g = _hidden_and_grads(model, SharedPrompts(prompts, ids_B_T, mask_B_T, N, "none"), weight)
    assert len(ref_g) > 10 and any("visual" in k for k in ref_g), "gradients must reach the vision tower"
    for mode in ("image", "prefix"):
        h, g = _hidden_and_grads(model, SharedPrompts(prompts, ids_B_T, mask_B_T, N, mode), weight)
        torch.testing.assert_close(h, ref_h, atol=1e-10, rtol=1e-10, msg=f"{family} {mode} hidden")
        assert g.keys() == ref_g.keys()
        for key in ref_g:
            # float64 throughout; the residual (<= ~1e-7 relative, prefix mode) comes from float32 steps
            # inside the attention (transformers' softmax upcast), far below float32 training noise.
            scale = float(ref_g[key].abs().max())
            torch.testing.assert_close(g[key], ref_g[key], atol=1e-6 * scale, rtol=0, msg=f"{family} {mode} {key}")


def test_naive_inputs_equal_response_hidden_states(tiny_qwen2_vl, tiny_images):
    model, processor = tiny_qwen2_vl
    shared = SharedPrompts(*_batch(processor, tiny_images), N, "none")
    with torch.no_grad():
        naive = NaiveInputs(shared.full_inputs(), T).response_hidden_states(model)
        torch.testing.assert_close(naive, shared.response_hidden_states(model), atol=1e-6, rtol=1e-5)


def _count_work(model, shared):
    """(image patches through the vision tower, token rows through the decoder) for one scoring."""
    seen = {"patches": 0, "tokens": 0}
    backbone = model.model
    h1 = backbone.visual.register_forward_hook(
        lambda m, a, out: seen.__setitem__("patches", seen["patches"] + a[0].shape[0])
    )
    h2 = backbone.language_model.register_forward_hook(
        lambda m, a, out: seen.__setitem__("tokens", seen["tokens"] + out.last_hidden_state.shape[:2].numel())
    )
    try:
        with torch.no_grad():
            shared.response_hidden_states(model)
    finally:
        h1.remove()
        h2.remove()
    return seen["patches"], seen["tokens"]


def test_each_image_encoded_once_and_prompt_decoded_once(tiny_qwen2_vl, tiny_images):
    model, processor = tiny_qwen2_vl
    prompts, ids_B_T, mask_B_T = _batch(processor, tiny_images)
    patches_P = prompts["pixel_values"].shape[0]
    L = prompts["input_ids"].shape[1]
    work = {m: _count_work(model, SharedPrompts(prompts, ids_B_T, mask_B_T, N, m)) for m in ("none", "image", "prefix")}
    assert work["none"] == (N * patches_P, 2 * N * (L + T))
    assert work["image"] == (patches_P, 2 * N * (L + T))
    assert work["prefix"] == (patches_P, 2 * L + 2 * N * (T - 1))


def test_sharing_mode_falls_back(tiny_models):
    qwen, _ = tiny_models("qwen2_vl")
    assert sharing_mode(qwen) == "prefix"
    assert sharing_mode(qwen, "image") == "image"
    assert sharing_mode(qwen, "none") == "none"
    assert sharing_mode(tiny_models("qwen3_5")[0]) == "image"  # hybrid linear-attention cache: no prefix
    assert sharing_mode(tiny_models("gemma3")[0]) == "none"
    checkpointed = copy.deepcopy(qwen)
    with warnings.catch_warnings():  # transformers 5.x renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert sharing_mode(checkpointed) == "image"  # checkpointing drops the KV cache in training
    with pytest.raises(ValueError, match="sharing mode"):
        sharing_mode(qwen, "fast")


def test_fallback_family_gives_straightforward_result(tiny_models, tiny_images):
    model, processor = tiny_models("gemma3")
    prompts = build_prompts(processor, list(tiny_images), ["What color?", "Is it green?"])
    ids_B_T = torch.randint(20, 200, (2 * N, T), generator=torch.Generator().manual_seed(0))
    mask_B_T = torch.ones_like(ids_B_T, dtype=torch.bool)
    with torch.no_grad():
        fast = SharedPrompts(prompts, ids_B_T, mask_B_T, N, "prefix").response_hidden_states(model)
        plain = SharedPrompts(prompts, ids_B_T, mask_B_T, N, "none").response_hidden_states(model)
    torch.testing.assert_close(fast, plain, atol=0, rtol=0)


@pytest.fixture(scope="module")
def step_setup(tmp_path_factory):
    from vopd.config import load_config
    from vopd.data import PairCollator

    cfg = load_config(
        None,
        [
            "model.path=tiny:qwen2_vl",
            "data.train=toyworld:4:0",
            "rollout.n=3",
            "rollout.max_new_tokens=5",
            "loss.top_k=16",
            "loss.chunk_size=7",
            "prompts_per_step=4",
            "micro_batch_prompts=2",
            "report_to=[jsonl]",
            "threads=1",
            "teacher.kind=frozen",
            f"output_dir={tmp_path_factory.mktemp('fastpath_step')}",
        ],
    )
    state, sampler, dataset, _ = train_setup.setup(cfg)
    collate = PairCollator(state.processor, thinking=cfg.model.thinking, max_prompt_tokens=None)
    batches = [collate([dataset[i] for i in idx]) for idx in list(iter(sampler))[:2]]
    return state, batches


@pytest.mark.parametrize("estimator", ["topk", "full"])
def test_train_step_same_loss_and_gradients_in_every_mode(step_setup, monkeypatch, estimator):
    """naive (full logits everywhere, loss in one piece) == straightforward == image-once == prefix."""
    state, batches = step_setup
    # The loss settings are built once at setup; this test swaps them between steps.
    monkeypatch.setattr(state, "knobs", LossKnobs.from_config(dataclasses.replace(state.cfg.loss, estimator=estimator)))
    results = {}
    for name, naive, sharing in [
        ("naive", True, None),
        ("none", False, "none"),
        ("image", False, "image"),
        ("prefix", False, "prefix"),
    ]:
        monkeypatch.setattr(state.cfg, "naive", naive)
        torch.manual_seed(123)  # same rollouts in every mode (the weights never change here)
        metrics = trainer_mod.train_step(state, batches, sharing=sharing, update=False)
        grads = {k: p.grad.clone() for k, p in state.policy.named_parameters() if p.grad is not None}
        state.optimizer.zero_grad(set_to_none=True)
        results[name] = (metrics, grads)
    ref_metrics, ref_grads = results["naive"]
    assert ref_metrics["divergence"] > 0 and ref_metrics["response_tokens"] > 12
    # The modes reorder float32 sums (KV cache vs full prompt, chunked vs whole loss), so logits agree
    # to `logit_error` of their own size, not to a fraction of the divergence built from them
    # (tests/support/tolerance.py derives both bounds). The scale: the largest logit on these prompts.
    with torch.no_grad():
        logit_scale = max(float(state.policy(**b.teacher).logits.abs().max()) for b in batches)
    text = state.policy.config.get_text_config()
    sequence = max(int(b.teacher["input_ids"].shape[1]) for b in batches) + state.cfg.rollout.max_new_tokens
    logp_error = logit_error(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        sequence=sequence,
        term_scale=logit_scale,
    )
    div_atol = divergence_atol(ref_metrics["divergence"], logp_error)
    assert div_atol < 0.1 * ref_metrics["divergence"], "the bound must stay far below the quantity compared"
    for name, (metrics, grads) in results.items():
        assert metrics["response_tokens"] == ref_metrics["response_tokens"], name
        assert metrics["divergence"] == pytest.approx(ref_metrics["divergence"], rel=0, abs=div_atol), name
        # logp_gap: a mean of teacher - student log-probs of the sampled tokens; nothing cancels.
        assert metrics["logp_gap"] == pytest.approx(ref_metrics["logp_gap"], rel=0, abs=2 * logp_error), name
        assert grads.keys() == ref_grads.keys(), name
        for key in ref_grads:
            # A gradient of D moves by ~logp_error / TV relative (its terms are (P - Q) * dz/dtheta,
            # TV <= sqrt(8 D)): 2.5e-3 for the top-k run here (D ~ 1.8e-6), 5e-4 for the full one.
            torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-7, rtol=2e-3, msg=f"{name} {key}")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_image_mode_with_several_images_per_prompt(tiny_models, tiny_images, family, monkeypatch):
    """Two images per prompt: each row must get its own prompt's images in order (not image-major copies)."""
    from vopd.models import append_responses, response_hidden_states

    model, processor = tiny_models(family)
    model = copy.deepcopy(model).double()
    big, small = tiny_images
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [
        f"<|im_start|>user\n{slot}{slot}Compare them.<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>user\n{slot}{slot}Which?<|im_end|>\n<|im_start|>assistant\n",
    ]
    monkeypatch.setattr(processor.tokenizer, "padding_side", "left")
    prompts = processor(images=[[big, small], [small, big]], text=texts, padding=True, return_tensors="pt")
    grid = prompts["image_grid_thw"]
    assert grid.shape[0] == 4
    ids_B_T = torch.randint(20, 200, (2 * N, T), generator=torch.Generator().manual_seed(0))
    mask_B_T = torch.ones_like(ids_B_T, dtype=torch.bool)
    # Independent reference: the rows built by hand, each with its prompt's two images.
    patches = prompts["pixel_values"].split(grid.prod(dim=1).tolist())
    rows = [p for p in range(2) for _ in range(N)]
    full = {k: prompts[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    full["pixel_values"] = torch.cat([patches[2 * p + i] for p in rows for i in range(2)])
    full["image_grid_thw"] = torch.cat([grid[2 * p : 2 * p + 2] for p in rows])
    with torch.no_grad():
        ref = response_hidden_states(model, append_responses(full, ids_B_T, mask_B_T), T)
        for mode in ("image", "prefix"):
            got = SharedPrompts(prompts, ids_B_T, mask_B_T, N, mode).response_hidden_states(model)
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10, msg=f"{family} {mode}")
