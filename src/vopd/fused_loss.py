"""The Vision-OPD loss without ever holding [tokens, vocabulary] logits: the memory machinery.

The loss itself (divergence, support, weights) is :mod:`vopd.objectives`; this module only decides
*how* it is computed over N response tokens and a vocabulary of V ids, where [N, V] logits (and
their gradient) would not fit:

- ``fused`` (a plain linear LM head, optionally soft-capped): :func:`fused_chunked_divergence`
  computes, chunk by chunk, the weighted loss *and* its gradients in the forward pass and adds the
  head gradient into one preallocated buffer; backward only scales the stored gradients.
- ``chunked`` (any other head): :func:`chunked_token_divergence`, each chunk under
  ``torch.utils.checkpoint`` (backward recomputes the chunk's logits).
- ``one piece`` (the student's logits are given, ``naive=true``): the loss at once.

:func:`distillation_loss` is the one call the trainer makes per micro-batch; it picks the path
from the student head it is given. The teacher side is a :class:`TeacherLogits`: the teacher's
final hidden states at the valid tokens plus its output head, turned into logits one chunk at a
time (never a callback into trainer code). All paths give the same loss and gradients
(tests/test_objectives_fused.py).

Axis suffixes: N flattened valid tokens, H hidden size, V vocabulary, C tokens of one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vopd.models import LinearHead, apply_softcap
from vopd.objectives import (
    LossKnobs,
    corrected_weights,
    mix_logits,
    per_token_divergence,
    token_nll,
    weighted_sum,
)

__all__ = [
    "TeacherLogits",
    "distillation_loss",
    "chunked_token_divergence",
    "fused_chunked_divergence",
    "nll_loss",
]

LogitsFn = Callable[[slice], Tensor]
Head = Callable[[Tensor], Tensor]


@dataclass
class TeacherLogits:
    """The teacher's logits at the N valid response tokens, made on demand (``self(rows)``), no grad.

    ``hidden_N_H`` are the teacher model's final hidden states, ``head`` its output head
    (`vopd.models.output_head`). A trust-region teacher also has the reference model's
    ``reference = (hidden_N_H, head)`` and ``mix``: its logits are
    :func:`vopd.objectives.mix_logits` of the two.
    """

    hidden_N_H: Tensor
    head: Head
    reference: tuple[Tensor, Head] | None = None
    mix: float = 1.0

    def __call__(self, rows: slice) -> Tensor:
        with torch.no_grad():
            if self.reference is None:
                return self.head(self.hidden_N_H[rows])
            ref_hidden_N_H, ref_head = self.reference
            return mix_logits(ref_head(ref_hidden_N_H[rows]), self.head(self.hidden_N_H[rows]), self.mix)


def distillation_loss(
    student_N: Tensor,
    head: LinearHead | Head | None,
    teacher: LogitsFn,
    weights_N: Tensor,
    knobs: LossKnobs,
    *,
    token_ids_N: Tensor | None = None,
    rollout_logp_N: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_n w_n * c_n * loss_n`` over the valid tokens and its gradients, as memory allows.

    ``student_N``: the student's final hidden states [N, H] with its ``head`` (a `LinearHead` takes
    the fused path, any other callable the checkpointed chunks), or its logits [N, V] with
    ``head=None`` (one piece). ``weights_N``: `vopd.objectives.token_weights`. ``c_n`` is the
    rollout correction when ``rollout_logp_N`` (the sampler's log-probs of ``token_ids_N``) is
    given, else 1. Returns ``(loss, stats)``: the detached [N] stats of
    `vopd.objectives.per_token_divergence`, plus ``weight_N`` (the weights used) and
    ``rollout_weight_N`` (``c_n``, when corrected).
    """
    if rollout_logp_N is not None and token_ids_N is None:
        raise ValueError("a rollout correction needs token_ids_N (the sampled tokens)")
    if isinstance(head, LinearHead):
        return fused_chunked_divergence(
            student_N,
            head.weight,
            head.bias,
            teacher,
            weights_N,
            knobs,
            token_ids_N=token_ids_N,
            softcap=head.softcap,
            rollout_logp_N=rollout_logp_N,
        )
    if head is None:  # the logits are given: the loss in one piece
        per_token_N, stats = per_token_divergence(student_N, teacher(slice(None)), token_ids_N, knobs)
        stats = {k: v.detach() for k, v in stats.items()}
    else:
        per_token_N, stats = chunked_token_divergence(student_N, head, teacher, knobs, token_ids_N=token_ids_N)
    weights_N, correction_N = corrected_weights(
        weights_N, stats.get("student_logp_N"), rollout_logp_N, clip=knobs.ratio_clip
    )
    stats["weight_N"] = weights_N.detach().to(per_token_N.dtype)
    if correction_N is not None:
        stats["rollout_weight_N"] = correction_N
    return weighted_sum(per_token_N, weights_N), stats


def _check_ids(num: int, token_ids_N: Tensor | None) -> None:
    if token_ids_N is not None and token_ids_N.shape != (num,):
        raise ValueError(
            f"token_ids_N must have shape ({num},) to match the student's {num} tokens, got {tuple(token_ids_N.shape)}"
        )


def nll_loss(
    student_N: Tensor,
    head: Head | None,
    token_ids_N: Tensor,
    weights_N: Tensor,
    knobs: LossKnobs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_n w_n * (-log p_S(y_n))``: the supervised baselines' loss, same weights as the divergence.

    ``student_N``: final hidden states [N, H] with the ``head`` (each chunk of ``knobs.chunk_size`` tokens
    under ``torch.utils.checkpoint``, so [N, V] logits are never held), or logits [N, V] with
    ``head=None``. Returns ``(loss, stats)`` with the detached ``student_logp_N`` and ``weight_N``.
    """
    num, chunk_size = student_N.shape[0], knobs.chunk_size
    if token_ids_N.shape != (num,) or weights_N.shape != (num,):
        raise ValueError(
            f"token_ids_N and weights_N must have shape ({num},), got {tuple(token_ids_N.shape)} "
            f"and {tuple(weights_N.shape)}"
        )
    if head is None:
        nll_N = token_nll(student_N, token_ids_N)
    else:

        def chunk_nll(hidden_C_H: Tensor, ids_C: Tensor) -> Tensor:
            return token_nll(head(hidden_C_H), ids_C)

        parts = []
        for start in range(0, num, chunk_size):
            rows = slice(start, min(start + chunk_size, num))
            if torch.is_grad_enabled():
                parts.append(checkpoint(chunk_nll, student_N[rows], token_ids_N[rows], use_reentrant=False))
            else:
                parts.append(chunk_nll(student_N[rows], token_ids_N[rows]))
        nll_N = torch.cat(parts) if parts else student_N.new_zeros(0, dtype=torch.float32)
    stats = {"student_logp_N": -nll_N.detach(), "weight_N": weights_N.detach().to(nll_N.dtype)}
    return weighted_sum(nll_N, weights_N), stats


# --- checkpointed chunks (any head) -------------------------------------------------------------


def chunked_token_divergence(
    student_hidden_N_H: Tensor,
    student_head: Head,
    teacher_logits_fn: LogitsFn,
    knobs: LossKnobs,
    *,
    token_ids_N: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [N] without ever holding [N, V] logits: ``knobs.chunk_size`` positions at a time.

    For each chunk, ``student_head(student_hidden_N_H[chunk])`` gives the student logits and
    ``teacher_logits_fn(chunk_slice)`` the teacher's (called under no_grad). Each chunk runs under
    ``torch.utils.checkpoint`` (non-reentrant), so only the chunk's hidden states are kept for the
    backward pass, which recomputes the chunk's logits (both ``student_head`` and
    ``teacher_logits_fn`` run again, so they must be deterministic). Same loss and gradients as the
    unchunked computation.

    Returns ``(loss_N, stats)`` with the detached [N] stats of `vopd.objectives.per_token_divergence`.
    """
    num, chunk_size = student_hidden_N_H.shape[0], knobs.chunk_size
    _check_ids(num, token_ids_N)

    def chunk_loss(hidden_C_H: Tensor, rows: slice, ids_C: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_C_V = teacher_logits_fn(rows)
        return per_token_divergence(student_head(hidden_C_H), teacher_C_V, ids_C, knobs)

    losses, chunk_stats = [], []
    for start in range(0, num, chunk_size):
        rows = slice(start, min(start + chunk_size, num))
        ids_C = None if token_ids_N is None else token_ids_N[rows]
        if torch.is_grad_enabled():
            loss_C, stats_C = checkpoint(chunk_loss, student_hidden_N_H[rows], rows, ids_C, use_reentrant=False)
        else:
            loss_C, stats_C = chunk_loss(student_hidden_N_H[rows], rows, ids_C)
        losses.append(loss_C)
        chunk_stats.append(stats_C)
    if not losses:
        raise ValueError("chunked_token_divergence got no tokens (student_hidden_N_H has N = 0)")
    stats = {key: torch.cat([s[key] for s in chunk_stats]).detach() for key in chunk_stats[0]}
    return torch.cat(losses), stats


# --- fused loss and gradient (a plain linear head) ----------------------------------------------


def fused_chunked_divergence(
    student_hidden_N_H: Tensor,
    head_weight_V_H: Tensor,
    head_bias_V: Tensor | None,
    teacher_logits_fn: LogitsFn,
    token_weights_N: Tensor,
    knobs: LossKnobs,
    *,
    token_ids_N: Tensor | None = None,
    softcap: float | None = None,
    rollout_logp_N: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_n w_n * loss_n`` and its gradients in one pass over chunks, never holding [N, V] logits.

    The same loss as :func:`chunked_token_divergence` followed by a weighted sum
    (`vopd.objectives.token_weights` gives the weights of ``aggregate``), for an output head that
    is a plain linear map ``logits = h W^T + b``, optionally soft-capped ``cap * tanh(logits / cap)``.
    Because the weights are known before the pass, the forward computes, chunk by chunk, the
    per-token loss *and* its gradient with respect to the chunk's logits, then turns that into the
    chunk's hidden-state gradient and adds the chunk's head gradient ``dL/dlogits^T h`` into one
    preallocated [V, H] buffer. Backward only scales the stored gradients by the incoming one.
    Compared with checkpointing every chunk this keeps one head gradient alive instead of two or
    three, and runs 3 head matmuls per chunk (logits, hidden gradient, weight gradient) plus the
    teacher's, instead of recomputing both heads in backward.

    ``token_weights_N`` [N] are constants (no gradient). With ``rollout_logp_N`` (the sampler's
    log-probs of ``token_ids_N``) each weight is multiplied by the chunk's
    `vopd.objectives.rollout_correction` (from the student's own log-probs, clipped at
    ``knobs.ratio_clip``). ``teacher_logits_fn`` is called once per chunk, under no_grad. Returns
    ``(loss, stats)``: a scalar in the loss dtype (float32, or float64 for float64 inputs), and the
    detached [N] stats of :func:`chunked_token_divergence` plus ``weight_N`` (the weights used)
    and ``rollout_weight_N`` (when corrected). Gradients reach ``student_hidden_N_H``,
    ``head_weight_V_H`` and ``head_bias_V``; it is not twice differentiable.
    """
    num = student_hidden_N_H.shape[0]
    _check_ids(num, token_ids_N)
    if num == 0:
        raise ValueError("fused_chunked_divergence got no tokens (student_hidden_N_H has N = 0)")
    if token_weights_N.shape != (num,):
        raise ValueError(f"token_weights_N must have shape ({num},), got {tuple(token_weights_N.shape)}")
    if rollout_logp_N is not None and (token_ids_N is None or rollout_logp_N.shape != (num,)):
        raise ValueError(f"rollout_logp_N needs token_ids_N and shape ({num},)")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    tensors = (student_hidden_N_H, head_weight_V_H) + (() if head_bias_V is None else (head_bias_V,))
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    plan = _FusedPlan(
        teacher_logits_fn,
        token_weights_N,
        token_ids_N,
        rollout_logp_N,
        knobs,
        softcap,
        want_grad,
    )
    stats: dict[str, Tensor] = {}
    loss = _FusedDivergence.apply(plan, stats, student_hidden_N_H, head_weight_V_H, head_bias_V)
    return loss, stats


@dataclass
class _FusedPlan:
    """The non-tensor arguments of `_FusedDivergence` (autograd.Function.apply is positional)."""

    teacher_logits_fn: LogitsFn
    weights_N: Tensor
    token_ids_N: Tensor | None
    rollout_logp_N: Tensor | None
    knobs: LossKnobs
    softcap: float | None
    want_grad: bool


def _chunk_logits(hidden_C_H: Tensor, weight_V_H: Tensor, bias_V: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(hidden_C_H.to(weight_V_H.dtype), weight_V_H, bias_V)


class _FusedDivergence(torch.autograd.Function):
    """Forward computes the weighted loss and all its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, plan: _FusedPlan, stats: dict, hidden_N_H: Tensor, weight_V_H: Tensor, bias_V: Tensor | None):
        num, weight, bias = hidden_N_H.shape[0], weight_V_H.detach(), None if bias_V is None else bias_V.detach()
        need_h = plan.want_grad and hidden_N_H.requires_grad
        need_w = plan.want_grad and weight_V_H.requires_grad
        need_b = plan.want_grad and bias_V is not None and bias_V.requires_grad
        grad_h = torch.zeros_like(hidden_N_H) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total, chunk_stats = None, []
        for start in range(0, num, plan.knobs.chunk_size):
            rows = slice(start, min(start + plan.knobs.chunk_size, num))
            hidden_C_H = hidden_N_H[rows].detach()
            with torch.no_grad():
                teacher_C_V = plan.teacher_logits_fn(rows)
            with torch.enable_grad():
                raw_C_V = _chunk_logits(hidden_C_H, weight, bias).requires_grad_(plan.want_grad)
                logits_C_V = apply_softcap(raw_C_V, plan.softcap)
                ids_C = None if plan.token_ids_N is None else plan.token_ids_N[rows]
                loss_C, stats_C = per_token_divergence(logits_C_V, teacher_C_V, ids_C, plan.knobs)
                del teacher_C_V, logits_C_V  # the graph keeps what backward needs; free the rest first
                stats_C = {k: v.detach() for k, v in stats_C.items()}
                rollout_C = None if plan.rollout_logp_N is None else plan.rollout_logp_N[rows]
                w_C, correction_C = corrected_weights(
                    plan.weights_N[rows], stats_C.get("student_logp_N"), rollout_C, clip=plan.knobs.ratio_clip
                )
                w_C = w_C.detach().to(loss_C.dtype)
                stats_C["weight_N"] = w_C
                if correction_C is not None:
                    stats_C["rollout_weight_N"] = correction_C
                part = (loss_C * w_C).sum()
                grad_C_V = torch.autograd.grad(part, raw_C_V)[0] if plan.want_grad else None
            del loss_C
            total = part.detach() if total is None else total + part.detach()
            chunk_stats.append(stats_C)
            if grad_C_V is None:
                continue
            grad_C_V = grad_C_V.to(weight.dtype)
            if need_h:
                grad_h[rows] = (grad_C_V @ weight).to(grad_h.dtype)
            if need_w:
                grad_w.addmm_(grad_C_V.T, hidden_C_H.to(weight.dtype))
            if need_b:
                grad_b += grad_C_V.sum(0).to(grad_b.dtype)
            del grad_C_V
        stats.update({key: torch.cat([s[key] for s in chunk_stats]) for key in chunk_stats[0]})
        ctx.grads = [grad_h, grad_w, grad_b]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_chunked_divergence: backward runs once per loss (its gradient buffers are "
                "handed to autograd); recompute the loss instead of using retain_graph=True"
            )
        grads, ctx.grads = ctx.grads, None  # hand the buffers over (autograd may adopt them as .grad)
        if not bool(grad_out == 1):
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return None, None, *grads
