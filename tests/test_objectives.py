"""Tests for vopd.objectives: against a from-the-definition reference, against TRL, and by property."""

from __future__ import annotations

import math
import os

import pytest
import torch
from support.knobs import knobs
from torch.testing import assert_close

from vopd.fused_loss import chunked_token_divergence
from vopd.knobs import ConfigError
from vopd.objectives import (
    add_tail_bucket,
    aggregate,
    generalized_jsd,
    rollout_correction,
    sampled_token_divergence,
    token_divergence,
)

F64 = torch.float64
# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
# Tolerances: float64 (F64) unless a test says otherwise. Reordered sums over a vocabulary of at most
# a few hundred log-probabilities of size <= 10 differ by <= n * 2**-53 * sum|x| ~ 1e-12, hence atol
# 1e-10 / 1e-12; atol=0 only where both sides run the same operations in the same order.
pytestmark = pytest.mark.numerics

BETAS = [0.0, 0.25, 0.5, 0.9, 1.0]
N, V, K = 6, 40, 5


def logits_pair(
    seed: int = 0, n: int = N, v: int = V, scale: float = 3.0, dtype=F64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded student/teacher logits; scale 3 makes the top-k hold a non-trivial share of the mass."""
    gen = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(n, v, generator=gen, dtype=F64)
    teacher = scale * torch.randn(n, v, generator=gen, dtype=F64)
    return student.to(dtype), teacher.to(dtype)


# --- brute-force reference, written from the definition in probability space --------------------


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return sum(float(p[i]) * math.log(float(p[i]) / float(q[i])) for i in range(len(p)) if p[i] > 0)


def ref_divergence(p_s: torch.Tensor, p_t: torch.Tensor, beta: float) -> float:
    """beta=0: KL(T||S); beta=1: KL(S||T); else beta KL(T||m) + (1-beta) KL(S||m), m = beta T + (1-beta) S."""
    if beta == 0.0:
        return ref_kl(p_t, p_s)
    if beta == 1.0:
        return ref_kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)


def ref_token_divergence(student, teacher, *, beta, top_k=None, add_tail=True, temperature=1.0, support="student"):
    out = []
    for s_row, t_row in zip(student.double(), teacher.double()):
        p_s, p_t = torch.softmax(s_row / temperature, -1), torch.softmax(t_row / temperature, -1)
        if top_k is not None:
            ids: set[int] = set()
            if support in ("student", "union"):
                ids |= set(torch.argsort(p_s, descending=True)[:top_k].tolist())
            if support in ("teacher", "union"):
                ids |= set(torch.argsort(p_t, descending=True)[:top_k].tolist())
            idx = torch.tensor(sorted(ids))
            p_s, p_t = p_s[idx], p_t[idx]
            if add_tail:
                p_s = torch.cat([p_s, (1 - p_s.sum()).reshape(1)])
                p_t = torch.cat([p_t, (1 - p_t.sum()).reshape(1)])
            else:
                p_s, p_t = p_s / p_s.sum(), p_t / p_t.sum()
        out.append(ref_divergence(p_s, p_t, beta))
    return torch.tensor(out, dtype=F64)


VARIANTS = {
    "full": dict(top_k=None),
    "topk_tail": dict(top_k=K, add_tail=True),
    "topk_renorm": dict(top_k=K, add_tail=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_reference(beta, variant):
    student, teacher = logits_pair()
    got = token_divergence(student, teacher, beta=beta, **VARIANTS[variant])
    want = ref_token_divergence(student, teacher, beta=beta, **VARIANTS[variant])
    assert got.shape == (N,)
    assert_close(got, want, rtol=0, atol=1e-10)
    assert (got > 1e-3).all()  # not trivially zero


@pytest.mark.parametrize("support", ["teacher", "union"])
@pytest.mark.parametrize("add_tail", [True, False])
def test_other_supports_match_reference(support, add_tail):
    student, teacher = logits_pair(seed=1)
    kw = dict(beta=0.5, top_k=K, add_tail=add_tail, support=support, temperature=0.7)
    assert_close(
        token_divergence(student, teacher, **kw), ref_token_divergence(student, teacher, **kw), rtol=0, atol=1e-10
    )


def test_temperature_scales_both_models():
    student, teacher = logits_pair(seed=2)
    kw = dict(beta=0.5, top_k=K)
    assert_close(
        token_divergence(student, teacher, temperature=2.0, **kw), token_divergence(student / 2, teacher / 2, **kw)
    )


def test_union_support_width_and_dedup():
    # Same logits -> the two top-k lists coincide, the union holds K ids (K duplicates dropped).
    student, _ = logits_pair(seed=3)
    teacher = student + 0.1 * logits_pair(seed=4)[0]
    got = token_divergence(student, teacher, top_k=K, support="union", add_tail=True)
    want = ref_token_divergence(student, teacher, beta=0.5, top_k=K, support="union")
    assert_close(got, want, rtol=0, atol=1e-10)


# --- TRL 1.16 as an independent implementation --------------------------------------------------
# Mapping: TRL's SDPO helpers take (student, teacher, alpha) with the mixture (1-alpha) p_S + alpha p_T
# and alpha * KL(T||m) + (1-alpha) KL(S||m): alpha == our beta, same argument order; alpha=0 is
# forward KL(T||S). GKDTrainer.generalized_jsd_loss(student, teacher, beta=...) has the same
# convention and divides both logits by temperature; reduction="none" returns per-vocab-entry terms.


@pytest.fixture(scope="module")
def trl_sdpo():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.sdpo import loss_utils

    return loss_utils


@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl_sdpo_helpers(trl_sdpo, beta):
    student, teacher = logits_pair(seed=5)
    for add_tail in (True, False):
        want = trl_sdpo.compute_topk_self_distillation_loss(
            student, teacher, distillation_topk=K, distillation_alpha=beta, distillation_add_tail=add_tail
        )
        got = token_divergence(student, teacher, beta=beta, top_k=K, add_tail=add_tail)
        assert_close(got, want, rtol=0, atol=1e-10)
    want_full = trl_sdpo.compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=beta)
    assert_close(token_divergence(student, teacher, beta=beta, top_k=None), want_full, rtol=0, atol=1e-10)
    logp_s, logp_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    assert_close(
        generalized_jsd(logp_s, logp_t, beta=beta),
        trl_sdpo.compute_divergence(logp_s, logp_t, beta),
        rtol=0,
        atol=1e-10,
    )


def test_matches_trl_tail_sampled_and_ratio(trl_sdpo):
    student, teacher = logits_pair(seed=6)
    topk_logp = torch.log_softmax(student, -1).topk(K, dim=-1).values
    assert_close(add_tail_bucket(topk_logp), trl_sdpo.add_tail_bucket(topk_logp), rtol=0, atol=1e-12)

    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    s = torch.log_softmax(student, -1).gather(-1, ids[:, None]).squeeze(-1)
    t = torch.log_softmax(teacher, -1).gather(-1, ids[:, None]).squeeze(-1)
    want = trl_sdpo.compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0)
    assert_close(sampled_token_divergence(s, t), want)

    old = s + torch.linspace(-1.5, 1.5, N, dtype=F64)
    loss = torch.ones(N, dtype=F64)
    # The sampler-mismatch weight is TRL's importance-sampling clip, with the sampler's log-probs as "old".
    assert_close(
        loss * rollout_correction(s, old, clip=2.0), trl_sdpo.apply_importance_sampling_clipping(loss, s, old, 2.0)
    )


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_matches_trl_gkd_with_temperature(beta):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher = logits_pair(seed=7)
    want = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=1.7, reduction="none").sum(-1)
    assert_close(token_divergence(student, teacher, beta=beta, top_k=None, temperature=1.7), want, rtol=0, atol=1e-10)


# --- algebraic properties -----------------------------------------------------------------------


def test_beta_ends_are_exact_kls_not_the_degenerate_mixture():
    student, teacher = logits_pair(seed=8)
    logp_s, logp_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    forward = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    reverse = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    assert_close(token_divergence(student, teacher, beta=0.0, top_k=None), forward, rtol=1e-13, atol=0)
    assert_close(token_divergence(student, teacher, beta=1.0, top_k=None), reverse, rtol=1e-13, atol=0)
    # The mixture formula itself vanishes at the ends; the special cases are what make 0/1 useful.
    assert token_divergence(student, teacher, beta=1e-9, top_k=None).max() < 1e-7
    assert (forward > 0.5).all() and (reverse > 0.5).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "kw", [dict(top_k=None), dict(top_k=K), dict(top_k=K, add_tail=False), dict(top_k=K, support="union")]
)
def test_identical_views_give_zero_loss_and_zero_grad(beta, kw):
    student, _ = logits_pair(seed=9)
    student.requires_grad_(True)
    loss = token_divergence(student, student.detach().clone(), beta=beta, **kw)
    loss.sum().backward()
    assert_close(loss, torch.zeros(N, dtype=F64), rtol=0, atol=1e-14)
    assert_close(student.grad, torch.zeros_like(student), rtol=0, atol=1e-14)


def test_gradient_reaches_student_only():
    student, teacher = logits_pair(seed=10)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    for kw in (dict(top_k=None), dict(top_k=K), dict(top_k=K, support="teacher")):
        student.grad = None
        token_divergence(student, teacher, **kw).sum().backward()
        assert teacher.grad is None
        assert student.grad.abs().sum() > 1e-3


def test_gradient_matches_finite_differences():
    student, teacher = logits_pair(seed=11, n=2, v=8)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: token_divergence(s, teacher, beta=0.4, top_k=3), (student,))
    assert torch.autograd.gradcheck(
        lambda s: token_divergence(s, teacher, beta=0.4, top_k=3, support="union"), (student,)
    )


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "kw", [dict(top_k=None), dict(top_k=K), dict(top_k=K, add_tail=False), dict(top_k=K, support="union")]
)
def test_near_one_hot_logits_are_finite(beta, kw):
    # float32, +-1e4 logits, different argmax in student and teacher: every probability is 0 or 1.
    student = torch.full((3, V), -1e4)
    teacher = torch.full((3, V), -1e4)
    student[:, 0] = 1e4
    teacher[:, 7] = 1e4
    student.requires_grad_(True)
    loss = token_divergence(student, teacher, beta=beta, **kw)
    loss.sum().backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert (loss > 0.1).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "kw", [dict(top_k=None), dict(top_k=K), dict(top_k=K, add_tail=False), dict(top_k=K, support="union")]
)
def test_masked_columns_are_ignored(beta, kw):
    # Vocabulary ids masked to -inf in both models (vision tokens) act as if removed from the vocabulary.
    student, teacher = logits_pair(seed=12)
    masked = torch.tensor([0, 3, 4, 20])
    keep = torch.tensor([i for i in range(V) if i not in masked.tolist()])
    student[:, masked] = float("-inf")
    teacher[:, masked] = float("-inf")
    student.requires_grad_(True)
    loss = token_divergence(student, teacher, beta=beta, **kw)
    loss.sum().backward()
    assert_close(loss, token_divergence(student[:, keep], teacher[:, keep], beta=beta, **kw), rtol=0, atol=1e-12)
    assert torch.isfinite(student.grad).all()
    assert (student.grad[:, masked] == 0).all()


def test_support_wider_than_unmasked_vocabulary_is_finite():
    student, teacher = logits_pair(seed=13, v=10)
    student[:, 6:] = float("-inf")
    teacher[:, 6:] = float("-inf")
    student.requires_grad_(True)
    loss = token_divergence(student, teacher, top_k=8)  # 2 of the 8 ids have probability 0
    loss.sum().backward()
    assert_close(loss, token_divergence(student[:, :6], teacher[:, :6], top_k=None), rtol=0, atol=1e-12)
    assert torch.isfinite(student.grad).all()


def test_tail_approaches_full_vocabulary_as_k_grows():
    # Top-k + tail is a coarse-graining of the vocabulary, so (data processing) the divergence is
    # non-decreasing in k, at most the full one, and equal to it once only one id is left in the tail.
    student, teacher = logits_pair(seed=14, v=20)
    full = token_divergence(student, teacher, top_k=None)
    values = torch.stack([token_divergence(student, teacher, top_k=k) for k in range(1, 20)])
    assert (values[1:] >= values[:-1] - 1e-12).all()
    assert (values <= full + 1e-12).all()
    assert_close(values[-1], full, rtol=0, atol=1e-12)
    assert_close(token_divergence(student, teacher, top_k=20), full, rtol=0, atol=0)
    assert_close(token_divergence(student, teacher, top_k=500), full, rtol=0, atol=0)
    assert (full - values[0] > 0.05).all()


def test_add_tail_bucket_sums_to_one_and_is_stable():
    logp = torch.log_softmax(logits_pair(seed=15)[0], -1).topk(K, dim=-1).values
    with_tail = add_tail_bucket(logp)
    assert with_tail.shape == (N, K + 1)
    assert_close(with_tail.exp().sum(-1), torch.ones(N, dtype=F64))
    # A support holding all the mass: tail ~eps, not log(0) or NaN.
    whole = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]], dtype=F64), -1)
    tail = add_tail_bucket(whole)[0, -1]
    assert torch.isfinite(tail) and tail.exp() <= 10 * torch.finfo(F64).eps


def test_bf16_inputs_are_upcast():
    student64, teacher64 = logits_pair(seed=16)
    student = student64.to(torch.bfloat16).requires_grad_(True)
    teacher = teacher64.to(torch.bfloat16)
    loss = token_divergence(student, teacher, top_k=K)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert_close(loss, token_divergence(student.detach().float(), teacher.float(), top_k=K), rtol=0, atol=0)
    assert_close(loss.double(), token_divergence(student64, teacher64, top_k=K), rtol=0.05, atol=1e-3)


def test_leading_dims_are_kept():
    student, teacher = logits_pair(seed=17)
    got = token_divergence(student.reshape(2, 3, V), teacher.reshape(2, 3, V), top_k=K)
    assert got.shape == (2, 3)
    assert_close(got.reshape(N), token_divergence(student, teacher, top_k=K))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=1.5), "beta"),
        (dict(top_k=0), "top_k"),
        (dict(temperature=0.0), "temperature"),
        (dict(support="both"), "support"),
    ],
)
def test_bad_knobs_raise(kwargs, match):
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match=match):
        token_divergence(student, teacher, **kwargs)


def test_shape_mismatch_raises():
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match="same shape"):
        token_divergence(student, teacher[:, :-1])


# --- sampled-token estimator and importance weights ---------------------------------------------


def test_sampled_token_gradient_is_reverse_kl_gradient_in_expectation():
    # Exact expectation over y ~ p_S: sum_y p_S(y) * grad[(lpS(y) - lpT(y)).detach() * lpS(y)].
    student, teacher = logits_pair(seed=18, n=3, v=7)
    student.requires_grad_(True)
    logp_s, logp_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    surrogate = sampled_token_divergence(logp_s, logp_t)  # every token as the "sampled" one
    (grad_expected,) = torch.autograd.grad((logp_s.exp().detach() * surrogate).sum(), student)
    (grad_reverse_kl,) = torch.autograd.grad(token_divergence(student, teacher, beta=1.0, top_k=None).sum(), student)
    assert_close(grad_expected, grad_reverse_kl, rtol=1e-12, atol=1e-14)
    # Value and per-sample gradient formula.
    assert_close(surrogate, (logp_s - logp_t) * logp_s)
    lp = torch.tensor([-0.5, -2.0], dtype=F64, requires_grad=True)
    sampled_token_divergence(lp, torch.tensor([-1.0, -1.0], dtype=F64)).sum().backward()
    assert_close(lp.grad, torch.tensor([0.5, -1.0], dtype=F64))


def test_rollout_correction_clip_and_detach():
    r = rollout_correction(torch.tensor([0.0, -1.0, 3.0], requires_grad=True), torch.tensor([0.0, 0.0, 0.0]), clip=1.5)
    assert_close(r, torch.tensor([1.0, math.exp(-1.0), 1.5]))
    assert not r.requires_grad
    with pytest.raises(ValueError, match="clip"):
        rollout_correction(torch.zeros(2), torch.zeros(2), clip=0.0)


# --- aggregate ----------------------------------------------------------------------------------


def test_aggregate_token_and_seq_mean_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert_close(aggregate(per_token, mask), torch.tensor(10.0 / 4, dtype=F64))
    assert_close(aggregate(per_token, mask, mode="seq_mean"), torch.tensor((2.0 + 4.0) / 2, dtype=F64))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_aggregate_padding_changes_nothing(mode):
    gen = torch.Generator().manual_seed(19)
    per_token = torch.rand(3, 5, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    base = aggregate(per_token, mask, mode=mode)
    # Garbage (incl. NaN / inf) in masked slots and a fully padded extra row.
    padded = torch.where(mask.bool(), per_token, torch.tensor(float("nan"), dtype=F64))
    padded[0, 3] = float("inf")
    padded = torch.cat([padded, torch.full((1, 5), 123.0, dtype=F64)])
    padded_mask = torch.cat([mask, torch.zeros(1, 5, dtype=mask.dtype)])
    assert_close(aggregate(padded, padded_mask, mode=mode), base, rtol=0, atol=0)
    # Wider padding on the token axis.
    wide = torch.cat([per_token, torch.full((3, 4), -7.0, dtype=F64)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], dim=1)
    assert_close(aggregate(wide, wide_mask, mode=mode), base, rtol=0, atol=0)


def test_aggregate_padding_gives_zero_grad_to_masked_slots():
    per_token = torch.rand(2, 4, dtype=F64, generator=torch.Generator().manual_seed(20)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    aggregate(per_token, mask).backward()
    assert_close(per_token.grad, mask.to(F64) / 5)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_aggregate_all_masked_is_zero(mode):
    per_token = torch.full((2, 3), float("nan"), dtype=F64, requires_grad=True)
    loss = aggregate(per_token, torch.zeros(2, 3), mode=mode)
    assert loss.item() == 0.0


def test_aggregate_global_counts_make_micro_batches_add_up():
    gen = torch.Generator().manual_seed(21)
    per_token = torch.rand(4, 6, generator=gen, dtype=F64)
    mask = (torch.rand(4, 6, generator=gen) > 0.3).long()
    mask[:, 0] = 1
    for mode, key, count in (("token_mean", "num_tokens", mask.sum()), ("seq_mean", "num_seqs", 4)):
        full = aggregate(per_token, mask, mode=mode)
        parts = sum(aggregate(per_token[i : i + 2], mask[i : i + 2], mode=mode, **{key: count}) for i in (0, 2))
        assert_close(parts, full)
    # Doubling the token count with the same summed loss halves the token mean.
    doubled = aggregate(per_token, mask, num_tokens=2 * mask.sum())
    assert_close(doubled, aggregate(per_token, mask) / 2)
    # Doubling the batch itself leaves the mean unchanged.
    assert_close(aggregate(per_token.repeat(2, 1), mask.repeat(2, 1)), aggregate(per_token, mask))


def test_aggregate_bad_mode_and_shape_raise():
    with pytest.raises(ValueError, match="mode"):
        aggregate(torch.ones(2, 2), torch.ones(2, 2), mode="sum")
    with pytest.raises(ValueError, match="shape"):
        aggregate(torch.ones(2, 2), torch.ones(2, 3))


# --- chunked driver -----------------------------------------------------------------------------


def chunk_setup(seed: int = 22, n: int = 7, h: int = 5, v: int = 30):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(h, v, generator=gen, dtype=F64, requires_grad=True)
    teacher_hidden = torch.randn(n, h, generator=gen, dtype=F64)
    teacher_weight = torch.randn(h, v, generator=gen, dtype=F64)
    token_ids = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, teacher_hidden, teacher_weight, token_ids


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize(
    "estimator, kw",
    [
        ("topk", dict(top_k=4, beta=0.5)),
        ("topk", dict(top_k=4, support="union", add_tail=False)),
        ("full", dict(beta=0.0)),
        ("sampled", dict(beta=1.0)),
    ],
)
def test_chunked_equals_unchunked(chunk_size, estimator, kw):
    hidden, weight, t_hidden, t_weight, ids = chunk_setup()
    teacher_logits = t_hidden @ t_weight
    loss, stats = chunked_token_divergence(
        hidden,
        lambda x: x @ weight,
        lambda rows: t_hidden[rows] @ t_weight,
        knobs(chunk_size=chunk_size, estimator=estimator, **kw),
        token_ids_N=ids,
    )
    grads = torch.autograd.grad(loss.pow(2).sum(), (hidden, weight))

    student_logits = hidden @ weight
    logp_s = torch.log_softmax(student_logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    logp_t = torch.log_softmax(teacher_logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    if estimator == "sampled":
        want = sampled_token_divergence(logp_s, logp_t)
    else:
        want = token_divergence(
            student_logits, teacher_logits, **(kw | ({"top_k": None} if estimator == "full" else {}))
        )
    want_grads = torch.autograd.grad(want.pow(2).sum(), (hidden, weight))
    assert loss.shape == (7,)
    assert_close(loss, want, rtol=0, atol=1e-12)
    for got_g, want_g in zip(grads, want_grads):
        assert_close(got_g, want_g, rtol=0, atol=1e-12)
    assert_close(stats["student_logp_N"], logp_s.detach())
    assert_close(stats["teacher_logp_N"], logp_t)
    assert all(not s.requires_grad and s.shape == (7,) for s in stats.values())


def test_chunked_tail_mass_stats():
    hidden, weight, t_hidden, t_weight, _ = chunk_setup(seed=23)
    _, stats = chunked_token_divergence(
        hidden, lambda x: x @ weight, lambda rows: t_hidden[rows] @ t_weight, knobs(chunk_size=2, top_k=4)
    )
    p_s = torch.softmax(hidden @ weight, -1)
    p_t = torch.softmax(t_hidden @ t_weight, -1)
    top_ids = p_s.topk(4, dim=-1).indices
    assert_close(stats["tail_mass_N"], 1 - p_s.gather(-1, top_ids).sum(-1).detach())
    assert_close(stats["teacher_tail_mass_N"], 1 - p_t.gather(-1, top_ids).sum(-1))
    _, full_stats = chunked_token_divergence(
        hidden, lambda x: x @ weight, lambda rows: t_hidden[rows] @ t_weight, knobs(estimator="full")
    )
    assert (full_stats["tail_mass_N"] == 0).all()


def test_chunked_never_keeps_vocab_sized_tensors_for_backward():
    hidden, weight, t_hidden, t_weight, _ = chunk_setup(seed=24, n=12, v=64)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_token_divergence(
            hidden, lambda x: x @ weight, lambda rows: t_hidden[rows] @ t_weight, knobs(chunk_size=3, top_k=4)
        )
    assert saved and all(64 not in shape for shape in saved), saved
    loss.sum().backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_chunked_without_grad_and_teacher_slices():
    hidden, weight, t_hidden, t_weight, _ = chunk_setup(seed=25)
    seen: list[slice] = []

    def teacher_fn(rows):
        seen.append(rows)
        return t_hidden[rows] @ t_weight

    with torch.no_grad():
        loss, _ = chunked_token_divergence(hidden, lambda x: x @ weight, teacher_fn, knobs(chunk_size=3))
    assert not loss.requires_grad
    assert seen == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert_close(loss, token_divergence(hidden @ weight, t_hidden @ t_weight))


@pytest.mark.parametrize(
    "loss, err, match",
    [
        (dict(estimator="topk", top_k=None), ConfigError, r"loss\.top_k expects an integer"),
        (dict(estimator="sampled", beta=0.5), ConfigError, "reverse KL only: set loss.beta=1"),
        (dict(estimator="beam"), ConfigError, r"loss\.estimator='beam' is not one of"),
        (dict(chunk_size=0), ConfigError, r"loss\.chunk_size"),
        (dict(topk=5), TypeError, "topk"),
    ],
)
def test_bad_loss_settings_are_refused_where_they_are_built(loss, err, match):
    """One validation: the loss settings are checked once, when ``loss.*`` is built."""
    with pytest.raises(err, match=match):
        knobs(**loss)


def test_knobs_read_top_k_for_the_topk_estimator_only():
    assert knobs(top_k=7).top_k == 7
    assert knobs(estimator="full", top_k=7).top_k is None
    assert knobs(estimator="sampled", beta=1.0, top_k=7).top_k is None


def test_chunked_sampled_needs_the_sampled_tokens():
    hidden, weight, t_hidden, t_weight, _ = chunk_setup()
    with pytest.raises(ValueError, match="token_ids_N"):
        chunked_token_divergence(
            hidden, lambda x: x @ weight, lambda rows: t_hidden[rows] @ t_weight, knobs(estimator="sampled", beta=1.0)
        )
