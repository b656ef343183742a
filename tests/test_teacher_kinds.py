"""Every teacher kind, the teacher views and the loss options through the real `train_step`.

Normalisations are checked on GRADIENTS against a reference written from the formula (AdamW's
first step is about lr * sign(g), so weights after one step cannot see a wrong scale).
"""

from __future__ import annotations

import math

import pytest
import torch
from support.steps import seeded_step

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec
import vopd.train_setup as train_setup
from vopd.config import load_config
from vopd.data import PairCollator
from vopd.models import append_responses, repeat_prompts, response_logits
from vopd.objectives import token_divergence

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

BASE = [
    "model.path=toy-base",
    "data.train=toyworld:4:0",
    "rollout.n=2",
    "rollout.max_new_tokens=5",
    "loss.top_k=16",
    "loss.chunk_size=5",
    "prompts_per_step=4",
    "micro_batch_prompts=2",
    "report_to=[jsonl]",
    "threads=1",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
    "seed=3",
]


def _setup(tmp_path, *extra):
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path}", *extra])
    state, sampler, dataset, _ = train_setup.setup(cfg)
    collate = PairCollator(state.processor, thinking=cfg.model.thinking, max_prompt_tokens=None)
    batches = [collate([dataset[i] for i in idx]) for idx in list(iter(sampler))[:2]]
    return state, batches


def _close_grads(got, want, *, scale=1.0, rtol=2e-3):
    assert got.keys() == want.keys()
    assert max(float(g.abs().max()) for g in want.values()) > 1e-6  # not a comparison of zeros
    for key in want:
        torch.testing.assert_close(got[key], scale * want[key], atol=1e-7, rtol=rtol, msg=key)


KINDS = ["ema", "frozen", "trust_region", "live", "external"]


@pytest.fixture(scope="module")
def first_step_reference(tmp_path_factory):
    """Divergence and gradients of step 1 with a frozen teacher (the initial model on the crop)."""
    store: dict = {}
    state, batches = _setup(tmp_path_factory.mktemp("ref"), "teacher.kind=frozen")
    metrics = seeded_step(state, batches, capture=store)
    return metrics, store["grads"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_teacher_kind_equals_the_initial_model_at_step_one(kind, tmp_path, monkeypatch, first_step_reference):
    """At step 1 every teacher is the initial model on the crop (trust region: lerp of equal logits;
    external: the same toy-base checkpoint), so the loss and gradients equal the frozen teacher's."""
    extra = ["teacher.kind=" + kind] + (["teacher.path=toy-base"] if kind == "external" else [])
    extra += ["teacher.mix=0.3"] if kind == "trust_region" else []
    if kind == "live":
        with pytest.warns(UserWarning, match="collapse"):
            state, batches = _setup(tmp_path, *extra)
    else:
        state, batches = _setup(tmp_path, *extra)
    store: dict = {}
    metrics = seeded_step(state, batches, capture=store)
    ref_metrics, ref_grads = first_step_reference
    assert state.teacher.kind == kind
    assert ref_metrics["divergence"] > 1e-3  # the crop teacher disagrees with the full-image student
    assert metrics["divergence"] == pytest.approx(ref_metrics["divergence"], rel=1e-5)
    _close_grads(store["grads"], ref_grads)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_weights_policy_after_optimiser_steps(kind, tmp_path):
    """After real AdamW steps: frozen / external stay at the initial weights, ema moves by ema_rate,
    live is the student, trust_region's logits are lerp(reference, current student, mix)."""
    extra = ["teacher.kind=" + kind, "teacher.ema_rate=0.25", "teacher.mix=0.3"]
    extra += ["teacher.path=toy-base"] if kind == "external" else []
    with pytest.warns(UserWarning) if kind == "live" else _no_context():
        state, batches = _setup(tmp_path, *extra)
    initial = {k: v.detach().clone() for k, v in state.policy.named_parameters()}
    teacher = state.teacher
    ema_before = {k: v.detach().clone() for k, v in teacher.model.named_parameters()} if kind == "ema" else None
    metrics = seeded_step(state, batches)
    assert metrics["skipped"] == 0.0
    student = dict(state.policy.named_parameters())
    moved = max(float((student[k].detach() - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4  # the student did move, so the checks below can fail
    if kind in ("frozen", "external"):
        for name, p in teacher.model.named_parameters():
            torch.testing.assert_close(p, initial[name], atol=0, rtol=0, msg=name)
    elif kind == "ema":
        for name, p in teacher.model.named_parameters():
            want = torch.lerp(ema_before[name], student[name].detach(), 0.25)
            torch.testing.assert_close(p, want, atol=1e-7, rtol=1e-6, msg=name)
    elif kind == "live":
        assert teacher.student is state.policy
    else:  # trust_region: score a batch and rebuild the mixed logits by hand
        for name, p in teacher.reference.named_parameters():
            torch.testing.assert_close(p, initial[name], atol=0, rtol=0, msg=name)
        prompts, ro = batches[0].teacher, state.engine.sample(state.policy, batches[0].student, state.cfg.rollout)
        full = append_responses(repeat_prompts(prompts, state.cfg.rollout.n), ro.response_ids_B_T, ro.mask_B_T)
        from vopd.scoring import FullInputs

        T = ro.response_ids_B_T.shape[1]
        got = teacher.score(FullInputs(full, T), ro.mask_B_T)(slice(None))
        with torch.no_grad():
            state.policy.eval()
            ref = response_logits(teacher.reference, full, T)[ro.mask_B_T]
            cur = response_logits(state.policy, full, T)[ro.mask_B_T]
            state.policy.train()
        torch.testing.assert_close(got, 0.7 * ref + 0.3 * cur, atol=1e-5, rtol=1e-5)
        assert float((cur - ref).abs().max()) > 1e-4


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_teacher_view_full_gives_about_zero_loss_at_step_one(tmp_path, monkeypatch):
    """No privileged view: the teacher is the initial model on the student's own image, so at
    step 1 teacher and student distributions coincide: zero loss, zero gradient."""
    state, batches = _setup(tmp_path, "teacher.kind=frozen", "teacher.view=full")
    store: dict = {}
    metrics = seeded_step(state, batches, capture=store)
    assert metrics["response_tokens"] > 8
    assert abs(metrics["divergence"]) < 1e-6
    assert abs(metrics["logp_gap"]) < 1e-5
    assert max(float(g.abs().max()) for g in store["grads"].values()) < 1e-5


def _recorded_rollouts(monkeypatch, state):
    """Record every rollout the engine hands the trainer; the first row of each batch ends after
    2 tokens (as if it sampled an EOS there), so rows differ in length."""
    seen = []
    real = state.engine.sample

    def sample(*args, **kwargs):
        ro = real(*args, **kwargs)
        ro.mask_B_T[0, 2:] = False
        seen.append(ro)
        return ro

    monkeypatch.setattr(state.engine, "sample", sample)
    return seen


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_aggregation_gradients_match_the_formula(aggregation, tmp_path, monkeypatch):
    """The step's gradient equals the gradient of the formula written out row by row: token_mean =
    sum of all token losses / all tokens; seq_mean = mean over rows of each row's token mean."""
    state, batches = _setup(tmp_path, "teacher.kind=frozen", f"loss.aggregation={aggregation}", "loss.estimator=full")
    store: dict = {}
    rollouts = _recorded_rollouts(monkeypatch, state)
    seeded_step(state, batches, capture=store)
    got = store["grads"]

    # The reference: full logits of both models, per-token JSD, then the sums by hand.
    n, per_row = state.cfg.rollout.n, []
    state.policy.zero_grad(set_to_none=True)
    for mb, ro in zip(batches, rollouts):
        T = ro.response_ids_B_T.shape[1]
        student_in = append_responses(repeat_prompts(mb.student, n), ro.response_ids_B_T, ro.mask_B_T)
        teacher_in = append_responses(repeat_prompts(mb.teacher, n), ro.response_ids_B_T, ro.mask_B_T)
        student_B_T_V = response_logits(state.policy, student_in, T)
        with torch.no_grad():
            teacher_B_T_V = response_logits(state.teacher.model, teacher_in, T)
        loss_B_T = token_divergence(student_B_T_V, teacher_B_T_V, beta=state.cfg.loss.beta, top_k=None)
        per_row += [loss_B_T[b][ro.mask_B_T[b]] for b in range(loss_B_T.shape[0])]
    if aggregation == "token_mean":
        reference = sum(r.sum() for r in per_row) / sum(len(r) for r in per_row)
    else:
        reference = sum(r.mean() for r in per_row) / len(per_row)
    reference.backward()
    want = {k: p.grad.clone() for k, p in state.policy.named_parameters() if p.grad is not None}
    _close_grads(got, want)
    lengths = {len(r) for r in per_row}
    assert len(lengths) > 1, "rows of equal length cannot tell token_mean from seq_mean"


# The HF engine's log-probs (cached decode, eval mode) match the trainer's forward to ~1e-3, so an
# unclipped weight is exp(shift) to that precision; a clipped one is exactly ratio_clip = 2.
@pytest.mark.parametrize("shift, scale, tol", [(0.5, math.exp(0.5), 3e-3), (1.0, 2.0, 1e-5)])
def test_rollout_correction_scales_the_gradient(shift, scale, tol, tmp_path, monkeypatch):
    """A sampler whose log-probs are `shift` lower than the trainer's: every token's weight is
    min(exp(shift), ratio_clip=2), so the gradient is that multiple of the uncorrected one."""
    state, batches = _setup(tmp_path, "teacher.kind=frozen")
    store: dict = {}
    plain = seeded_step(state, batches, capture=store)
    plain_grads = store.pop("grads")

    real = state.engine.sample

    def biased(*args, **kwargs):
        ro = real(*args, **kwargs)
        ro.sampler_logp_B_T = ro.sampler_logp_B_T - shift * ro.mask_B_T
        return ro

    monkeypatch.setattr(state.engine, "sample", biased)
    monkeypatch.setattr(state.cfg.loss, "rollout_correction", True)
    corrected = seeded_step(state, batches, capture=store)
    assert corrected["rollout_weight"] == pytest.approx(scale, rel=tol)
    assert corrected["divergence"] == pytest.approx(scale * plain["divergence"], rel=tol)
    if scale == 2.0:  # clipped: every token's weight is exactly 2, so the gradient is exactly doubled
        _close_grads(store["grads"], plain_grads, scale=scale)
