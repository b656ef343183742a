"""`fused_chunked_divergence` equals `chunked_token_divergence` + `aggregate`: loss, stats and the
gradients of the hidden states, head weight and head bias (float64, 1e-10); the three paths of
`distillation_loss` agree."""

from __future__ import annotations

import pytest
import torch
from support.knobs import knobs as loss_knobs

from vopd.fused_loss import chunked_token_divergence, fused_chunked_divergence
from vopd.objectives import aggregate

H, V, B, T = 6, 37, 3, 5
# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
# Tolerances: float64 throughout. Two orderings of a sum of n terms differ by <= n * 2**-53 * sum|x|
# (tests/support/tolerance.py); here n <= V * H = a few thousand and the terms are O(10), so ~1e-11
# at worst: atol 1e-10 (1e-12 where the sums are shorter: chunking only splits rows, never a sum).
pytestmark = pytest.mark.numerics

ESTIMATORS = {
    "topk": dict(estimator="topk", beta=0.5, top_k=7, add_tail=True),
    "topk_renorm_union_temp": dict(
        estimator="topk", beta=0.3, top_k=5, add_tail=False, support="union", temperature=0.7
    ),
    "full_forward_kl": dict(estimator="full", beta=0.0),
    "full_jsd": dict(estimator="full", beta=0.5),
    "sampled": dict(estimator="sampled", beta=1.0),
}


def _problem(seed: int = 0, *, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    mask_B_T = torch.ones(B, T, dtype=torch.bool)
    mask_B_T[0, 3:] = False
    mask_B_T[2, 1:] = False
    num = int(mask_B_T.sum())
    hidden_N_H = torch.randn(num, H, generator=g, dtype=torch.float64)
    weight_V_H = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias_V = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    teacher_N_V = torch.randn(num, V, generator=g, dtype=torch.float64) * 2
    ids_N = torch.randint(0, V, (num,), generator=g)
    return mask_B_T, hidden_N_H, weight_V_H, bias_V, teacher_N_V, ids_N


def _weights(mask_B_T: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights that make a weighted sum equal `aggregate(mode)` (local counts)."""
    if mode == "token_mean":
        return torch.full((int(mask_B_T.sum()),), 1.0 / int(mask_B_T.sum()), dtype=torch.float64)
    lengths_B = mask_B_T.sum(1, keepdim=True).expand_as(mask_B_T)
    return 1.0 / (lengths_B[mask_B_T].double() * int((mask_B_T.sum(1) > 0).sum()))


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_(True) for t in tensors]


def _head(weight, bias, softcap):
    def project(h):
        logits = torch.nn.functional.linear(h, weight, bias)
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    return project


def _reference(mask_B_T, hidden, weight, bias, teacher_N_V, ids_N, loss, *, mode, softcap=None, chunk=4):
    per_token_N, stats = chunked_token_divergence(
        hidden,
        _head(weight, bias, softcap),
        lambda rows: teacher_N_V[rows],
        loss_knobs(chunk_size=chunk, **loss),
        token_ids_N=ids_N,
    )
    per_token_B_T = torch.zeros(mask_B_T.shape, dtype=per_token_N.dtype).masked_scatter(mask_B_T, per_token_N)
    return aggregate(per_token_B_T, mask_B_T, mode=mode), stats


def _grads(loss, leaves):
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_equals_chunked_plus_aggregate(name, mode, softcap):
    loss_keys = ESTIMATORS[name]
    mask_B_T, hidden, weight, bias, teacher_N_V, ids_N = _problem()
    ref_leaves = _leaves(hidden, weight, bias)
    ref_loss, ref_stats = _reference(mask_B_T, *ref_leaves, teacher_N_V, ids_N, loss_keys, mode=mode, softcap=softcap)
    ref_grads = _grads(ref_loss, ref_leaves)
    leaves = _leaves(hidden, weight, bias)
    loss, stats = fused_chunked_divergence(
        *leaves,
        lambda rows: teacher_N_V[rows],
        _weights(mask_B_T, mode),
        loss_knobs(chunk_size=3, **loss_keys),
        token_ids_N=ids_N,
        softcap=softcap,
    )
    grads = _grads(loss, leaves)
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert float(ref_loss.detach()) != 0.0
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
    for got, want, what in zip(grads, ref_grads, ("hidden", "weight", "bias")):
        assert float(want.abs().max()) > 1e-6, what  # the comparison is not between zeros
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=what)
    for key, value in ref_stats.items():
        torch.testing.assert_close(stats[key], value, atol=1e-10, rtol=0, msg=key)
    torch.testing.assert_close(stats["weight_N"], _weights(mask_B_T, mode), atol=0, rtol=0)


def test_chunk_size_and_upstream_gradient_scale():
    """Any chunk size gives the same result; d(c * L) = c * dL (backward scales the stored grads)."""
    mask_B_T, hidden, weight, _, teacher_N_V, ids_N = _problem(1, bias=False)
    w_N = _weights(mask_B_T, "token_mean")
    results = []
    for chunk, scale in [(1, 1.0), (5, 1.0), (100, 2.5)]:
        leaves = _leaves(hidden, weight)
        loss, _ = fused_chunked_divergence(
            *leaves, None, lambda r: teacher_N_V[r], w_N, loss_knobs(chunk_size=chunk, top_k=7)
        )
        (scale * loss).backward()
        results.append((loss.detach(), leaves[0].grad / scale, leaves[1].grad / scale))
    for loss, grad_h, grad_w in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grad_h, results[0][1], atol=1e-12, rtol=0)
        torch.testing.assert_close(grad_w, results[0][2], atol=1e-12, rtol=0)


def test_rollout_correction_from_chunk_stats_and_gradients_accumulate():
    """The rollout correction made inside the pass from each chunk's student log-probs equals
    precomputed weights; gradients add to an existing .grad."""
    mask_B_T, hidden, weight, bias, teacher_N_V, ids_N = _problem(2)
    _, full_stats = chunked_token_divergence(
        hidden, _head(weight, bias, None), lambda r: teacher_N_V[r], loss_knobs(top_k=7), token_ids_N=ids_N
    )
    sampler_logp_N = full_stats["student_logp_N"] + 0.8 * torch.randn(
        len(ids_N), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    correction_N = (full_stats["student_logp_N"] - sampler_logp_N).exp().clamp(max=2.0)
    assert float((correction_N - 1).abs().max()) > 0.1 and float(correction_N.max()) == 2.0  # clipped somewhere
    base_N = torch.full((len(ids_N),), 1.0 / len(ids_N), dtype=torch.float64)
    outs = []
    for weights, rollout in ((base_N * correction_N, None), (base_N, sampler_logp_N)):
        leaves = _leaves(hidden, weight, bias)
        for _ in range(2):  # second pass accumulates into the existing .grad
            loss, stats = fused_chunked_divergence(
                *leaves,
                lambda r: teacher_N_V[r],
                weights,
                loss_knobs(chunk_size=4, top_k=7, ratio_clip=2.0),
                token_ids_N=ids_N,
                rollout_logp_N=rollout,
            )
            loss.backward()
        outs.append((loss.detach(), stats, [t.grad for t in leaves]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs[1][1]["weight_N"], base_N * correction_N, atol=1e-12, rtol=0)
    torch.testing.assert_close(outs[1][1]["rollout_weight_N"], correction_N, atol=1e-12, rtol=0)
    assert "rollout_weight_N" not in outs[0][1]
    for got, want in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rollout", [False, True])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_distillation_loss_paths_agree(rollout, mode):
    """The one call the trainer makes: fused (linear head), chunked (other head) and one piece
    (logits given) give the same loss, stats and gradients, rollout correction included."""
    from vopd.fused_loss import distillation_loss
    from vopd.models import LinearHead
    from vopd.objectives import token_weights

    mask_B_T, hidden, weight, bias, teacher_N_V, ids_N = _problem(5)
    knobs = loss_knobs(top_k=7, beta=0.3, chunk_size=3)
    weights_N = token_weights(mask_B_T, mode)
    rollout_logp_N = (
        -torch.rand(len(ids_N), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
        if rollout
        else None
    )
    results = []
    for path in ("fused", "chunked", "one_piece"):
        leaves = _leaves(hidden, weight, bias)
        if path == "fused":
            student, head = leaves[0], LinearHead(leaves[1], leaves[2], 3.0)
        elif path == "chunked":
            student, head = leaves[0], _head(leaves[1], leaves[2], 3.0)
        else:
            student, head = _head(leaves[1], leaves[2], 3.0)(leaves[0]), None
        loss, stats = distillation_loss(
            student,
            head,
            lambda r: teacher_N_V[r],
            weights_N,
            knobs,
            token_ids_N=ids_N,
            rollout_logp_N=rollout_logp_N,
        )
        results.append((loss.detach(), stats, _grads(loss, leaves)))
    ref_loss, ref_stats, ref_grads = results[0]
    assert float(ref_loss) != 0.0 and ("rollout_weight_N" in ref_stats) == rollout
    for loss, stats, grads in results[1:]:
        torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
        for key in ref_stats:
            torch.testing.assert_close(stats[key], ref_stats[key], atol=1e-10, rtol=0, msg=key)
        for got, want in zip(grads, ref_grads):
            assert float(want.abs().max()) > 1e-6
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_no_grad_gives_the_loss_only_and_bad_arguments_raise():
    mask_B_T, hidden, weight, _, teacher_N_V, ids_N = _problem(3, bias=False)
    w_N = _weights(mask_B_T, "token_mean")
    leaves = _leaves(hidden, weight)
    with torch.no_grad():
        loss, _ = fused_chunked_divergence(*leaves, None, lambda r: teacher_N_V[r], w_N, loss_knobs(top_k=7))
    ref, _ = _reference(mask_B_T, hidden, weight, None, teacher_N_V, ids_N, dict(top_k=7), mode="token_mean")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="token_weights_N must have shape"):
        fused_chunked_divergence(*leaves, None, lambda r: teacher_N_V[r], w_N[:-1], loss_knobs(top_k=7))
    with pytest.raises(ValueError, match="softcap"):
        fused_chunked_divergence(*leaves, None, lambda r: teacher_N_V[r], w_N, loss_knobs(top_k=7), softcap=0.0)


def test_second_backward_raises_clearly():
    """A retained graph cannot be backpropagated twice (the buffers were handed over): clear error,
    not a TypeError."""
    mask_B_T, hidden, weight, _, teacher_N_V, ids_N = _problem(4, bias=False)
    w_N = _weights(mask_B_T, "token_mean")
    leaves = _leaves(hidden, weight)
    loss, _ = fused_chunked_divergence(*leaves, None, lambda r: teacher_N_V[r], w_N, loss_knobs(chunk_size=4, top_k=7))
    (grad_h,) = torch.autograd.grad(loss, leaves[0], retain_graph=True)
    assert float(grad_h.abs().max()) > 0
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()
    with pytest.raises(ValueError, match="rollout_logp_N needs token_ids_N"):
        fused_chunked_divergence(*leaves, None, lambda r: teacher_N_V[r], w_N, loss_knobs(top_k=7), rollout_logp_N=w_N)
