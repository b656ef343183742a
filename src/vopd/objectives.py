"""The Vision-OPD loss, top to bottom: per-token divergences, support and tail, token weights, aggregation.

The student p_S sees the full image, the teacher p_T the evidence crop; both score the same
response tokens. At every response position we compare their next-token distributions with the
generalized Jensen-Shannon divergence (docs/method.md, "Objective")

    m       = beta * p_T + (1 - beta) * p_S
    JSD_b   = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

with beta = 0 meaning forward KL(p_T || p_S) and beta = 1 reverse KL(p_S || p_T). (The mixture
formula itself goes to 0 at both ends, so the two ends are special-cased, not limits of it.)

The distributions are compared on a *support* of categories (section 2.2): the full vocabulary,
or K vocabulary ids plus one tail category holding the rest of the mass. Each token's divergence
gets a weight (the normaliser of the aggregation, times a rollout correction when the sampler is
not the trainer), and the loss is the weighted sum:

    loss = sum_n  w_n * D(p_S(. | y_<n), p_T(. | y_<n))

Everything here is a small pure function on tensors; the teacher is always a stop-gradient
target. How the loss is computed without holding [tokens, vocab] logits (chunks, a fused
gradient) is a separate concern: :mod:`vopd.fused_loss`, which calls :func:`per_token_divergence`
and :func:`token_weights` from here.

Axis suffixes: B rows, T response tokens, V vocabulary, K support size, N flattened valid tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vopd.config import LossConfig

AGGREGATIONS = ("token_mean", "seq_mean")


# --- the settings, built once ------------------------------------------------------------------


@dataclass(frozen=True)
class LossKnobs:
    """The loss settings the functions here and in :mod:`vopd.fused_loss` read.

    Built once, by :meth:`from_config`, from a :class:`vopd.config.LossConfig` (``loss.*``), which
    holds each knob's one default and checks every value and combination when it is built (a bad
    value is a `ConfigError` naming the key). The trainer builds it at setup and passes it
    unchanged to every micro-batch's loss.

    ``top_k`` is the support size for ``estimator="topk"`` and None otherwise (``"full"``: the
    whole vocabulary; ``"sampled"``: the sampled token only, reverse KL, ``beta`` = 1).
    ``chunk_size`` is the number of response tokens per chunk of the vocabulary projection
    (memory only: results do not depend on it); ``ratio_clip`` clips the rollout correction.
    """

    estimator: str
    beta: float
    top_k: int | None
    add_tail: bool
    temperature: float
    support: str
    chunk_size: int
    ratio_clip: float

    @classmethod
    def from_config(cls, loss: LossConfig) -> LossKnobs:
        """The settings of ``loss`` (already checked when it was built)."""
        return cls(
            estimator=loss.estimator,
            beta=loss.beta,
            top_k=loss.top_k if loss.estimator == "topk" else None,
            add_tail=loss.add_tail,
            temperature=loss.temperature,
            support=loss.support,
            chunk_size=loss.chunk_size,
            ratio_clip=loss.ratio_clip,
        )


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")


# --- divergence over categories -----------------------------------------------------------------


def _kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """Elementwise p * (log p - log q), with 0 wherever p == 0 (0 * log 0 = 0, also for -inf inputs).

    The logs are zeroed where p == 0 *before* the subtraction so that -inf - -inf never produces a
    NaN, not even in the backward pass.
    """
    p = logp.exp()
    live = p > 0
    return p * (torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0))


def _log_mixture(teacher_logp: Tensor, student_logp: Tensor, beta: float) -> Tensor:
    """log(beta * p_T + (1 - beta) * p_S), NaN-free (values and gradients) where both are -inf."""
    both_dead = torch.isneginf(teacher_logp) & torch.isneginf(student_logp)
    log_t = torch.where(both_dead, 0.0, teacher_logp) + math.log(beta)
    log_s = torch.where(both_dead, 0.0, student_logp) + math.log1p(-beta)
    return torch.where(both_dead, float("-inf"), torch.logaddexp(log_t, log_s))


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, *, beta: float) -> Tensor:
    """Generalized JSD between two categorical distributions given as log-probs over the last dim.

    Returns ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)`` with ``m = beta p_T + (1 - beta) p_S``,
    summed over the last dim. ``beta = 0`` is exactly forward KL(p_T || p_S) and ``beta = 1`` exactly
    reverse KL(p_S || p_T). Entries may be -inf (zero probability); they contribute 0. Inputs are
    used as given (no renormalisation, no detach): callers decide what is a target.
    """
    _check_beta(beta)
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student and teacher log-probs differ in shape: {tuple(student_logp.shape)} vs {tuple(teacher_logp.shape)}"
        )
    if beta == 0.0:
        return _kl_terms(teacher_logp, student_logp).sum(-1)
    if beta == 1.0:
        return _kl_terms(student_logp, teacher_logp).sum(-1)
    log_m = _log_mixture(teacher_logp, student_logp, beta)
    kl_teacher = _kl_terms(teacher_logp, log_m).sum(-1)
    kl_student = _kl_terms(student_logp, log_m).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


# --- support and tail ---------------------------------------------------------------------------


def add_tail_bucket(logp_N_K: Tensor) -> Tensor:
    """Append one category holding the probability mass outside a top-k support: [..., K] -> [..., K+1].

    ``logp_N_K`` are full-vocabulary log-probs at K ids, so their probabilities sum to the captured
    mass P_K <= 1. The appended entry is log(1 - P_K), computed as log(-expm1(log P_K)) with log P_K
    clamped just below 0 (by the dtype's epsilon), so a support that holds (numerically) all the mass
    gets a tail of ~eps instead of log(0) or NaN.
    """
    log_captured = torch.logsumexp(logp_N_K, dim=-1, keepdim=True)
    log_captured = log_captured.clamp(max=-torch.finfo(logp_N_K.dtype).eps)
    return torch.cat([logp_N_K, torch.log(-torch.expm1(log_captured))], dim=-1)


def _renormalise(logp_N_K: Tensor) -> Tensor:
    """Condition on the support: the top-k distribution divided by its own mass."""
    return logp_N_K - torch.logsumexp(logp_N_K, dim=-1, keepdim=True)


def _outside_mass(logp_N_K: Tensor) -> Tensor:
    """Probability mass outside the support, 1 - sum(p_K), in [0, 1]."""
    return -torch.expm1(torch.logsumexp(logp_N_K, dim=-1).clamp(max=0.0))


def _support_ids(
    student_logits_N_V: Tensor, teacher_logits_N_V: Tensor, top_k: int, support: str
) -> tuple[Tensor, Tensor | None]:
    """Vocabulary ids of the support [N, K'] and, for "union", a mask of duplicate ids to drop."""
    if support == "student":
        return student_logits_N_V.topk(top_k, dim=-1).indices, None
    if support == "teacher":
        return teacher_logits_N_V.topk(top_k, dim=-1).indices, None
    # Union: concatenate both top-k lists (fixed width 2K), sort, and drop the second copy of any id
    # found in both, so each id counts once while shapes stay static.
    student_ids_N_K = student_logits_N_V.topk(top_k, dim=-1).indices
    teacher_ids_N_K = teacher_logits_N_V.topk(top_k, dim=-1).indices
    both_N_2K = torch.cat([student_ids_N_K, teacher_ids_N_K], dim=-1)
    ids_N_2K = both_N_2K.sort(dim=-1).values
    duplicate_N_2K = torch.zeros_like(ids_N_2K, dtype=torch.bool)
    duplicate_N_2K[..., 1:] = ids_N_2K[..., 1:] == ids_N_2K[..., :-1]
    return ids_N_2K, duplicate_N_2K


def _gather_logp(logits_N_V: Tensor, log_z_N_1: Tensor, ids_N_K: Tensor, drop_N_K: Tensor | None) -> Tensor:
    """Full-vocabulary log-probs at ``ids`` (logit - logsumexp); dropped ids get -inf (probability 0)."""
    logp_N_K = logits_N_V.gather(-1, ids_N_K) - log_z_N_1
    return logp_N_K if drop_N_K is None else logp_N_K.masked_fill(drop_N_K, float("-inf"))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 logits are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _scale(logits_N_V: Tensor, temperature: float) -> Tensor:
    """logits / temperature, without an extra [N, V] copy at the common temperature 1."""
    return logits_N_V if temperature == 1.0 else logits_N_V / temperature


# --- per-token divergence -----------------------------------------------------------------------


def per_token_divergence(
    student_logits_N_V: Tensor, teacher_logits_N_V: Tensor, token_ids_N: Tensor | None, knobs: LossKnobs
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [N] and detached per-token stats; the single place the loss is assembled.

    Stats: ``tail_mass_N`` / ``teacher_tail_mass_N`` (mass outside the support; 0 for the full
    vocabulary and the sampled estimator) and, with ``token_ids_N``, ``student_logp_N`` /
    ``teacher_logp_N`` of those tokens (for importance weights and metrics).
    """
    if student_logits_N_V.shape != teacher_logits_N_V.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_N_V.shape)} and teacher logits {tuple(teacher_logits_N_V.shape)} "
            "must have the same shape (same response positions, same vocabulary)"
        )
    beta, top_k = knobs.beta, knobs.top_k
    dtype = _compute_dtype(student_logits_N_V, teacher_logits_N_V)
    student = _scale(student_logits_N_V.to(dtype), knobs.temperature)
    teacher = _scale(teacher_logits_N_V.detach().to(dtype), knobs.temperature)  # stop-gradient target
    student_log_z = torch.logsumexp(student, dim=-1, keepdim=True)
    teacher_log_z = torch.logsumexp(teacher, dim=-1, keepdim=True)

    stats: dict[str, Tensor] = {}
    if token_ids_N is not None:
        ids_N_1 = token_ids_N.unsqueeze(-1).long()
        student_token_logp = _gather_logp(student, student_log_z, ids_N_1, None).squeeze(-1)
        teacher_token_logp = _gather_logp(teacher, teacher_log_z, ids_N_1, None).squeeze(-1)
        stats["student_logp_N"] = student_token_logp.detach()
        stats["teacher_logp_N"] = teacher_token_logp
    if knobs.estimator == "sampled":
        if token_ids_N is None:
            raise ValueError("estimator='sampled' needs token_ids_N (the sampled response token at each position)")
        zeros = torch.zeros(student.shape[:-1], dtype=dtype, device=student.device)
        stats |= {"tail_mass_N": zeros, "teacher_tail_mass_N": zeros}
        return sampled_token_divergence(student_token_logp, teacher_token_logp), stats

    vocab = student.shape[-1]
    if top_k is None or top_k >= vocab:
        # The support is the whole vocabulary: no tail, nothing to renormalise.
        student_logp, teacher_logp = student - student_log_z, teacher - teacher_log_z
        zeros = torch.zeros(student.shape[:-1], dtype=dtype, device=student.device)
        stats |= {"tail_mass_N": zeros, "teacher_tail_mass_N": zeros}
        return generalized_jsd(student_logp, teacher_logp, beta=beta), stats

    ids_N_K, drop_N_K = _support_ids(student, teacher, top_k, knobs.support)
    student_logp_N_K = _gather_logp(student, student_log_z, ids_N_K, drop_N_K)
    teacher_logp_N_K = _gather_logp(teacher, teacher_log_z, ids_N_K, drop_N_K)
    stats["tail_mass_N"] = _outside_mass(student_logp_N_K.detach())
    stats["teacher_tail_mass_N"] = _outside_mass(teacher_logp_N_K)
    close = add_tail_bucket if knobs.add_tail else _renormalise
    return generalized_jsd(close(student_logp_N_K), close(teacher_logp_N_K), beta=beta), stats


def token_divergence(
    student_logits_N_V: Tensor,
    teacher_logits_N_V: Tensor,
    *,
    beta: float = 0.5,
    top_k: int | None = 100,
    add_tail: bool = True,
    temperature: float = 1.0,
    support: str = "student",
) -> Tensor:
    """Per-token generalized JSD between student and teacher next-token distributions: [..., V] -> [...].

    Both logits are divided by ``temperature``. With ``top_k=None`` (or ``top_k >= V``) the
    divergence is over the full vocabulary. Otherwise the support is K vocabulary ids, chosen by
    ``support``:

    - ``"student"`` (the paper's choice): the student's top-k ids;
    - ``"teacher"``: the teacher's top-k ids (keeps teacher modes the student misses out of the tail);
    - ``"union"``: both lists, each id once (width 2K; ids found in both are dropped once as -inf).

    At those ids both models' *full-vocabulary* log-probs are taken (logit - logsumexp over all of
    V, not renormalised); ``add_tail=True`` appends the leftover mass as one extra category
    (:func:`add_tail_bucket`), ``add_tail=False`` renormalises the K entries instead (divergence of
    the distributions conditioned on the support).

    Computed in float32 (float64 if an input is float64), whatever the input dtype. The teacher is
    detached: gradients reach ``student_logits_N_V`` only. Logits masked to -inf in both models
    (e.g. vision-token ids) are ignored; a row that is -inf everywhere gives NaN, so pass valid
    tokens only.
    """
    # The math on its own, with the checks of loss.* (a bad value is a ConfigError, a ValueError).
    loss = LossConfig(
        estimator="topk" if top_k is not None else "full",
        beta=beta,
        add_tail=add_tail,
        temperature=temperature,
        support=support,
        **({} if top_k is None else {"top_k": top_k}),
    )
    return per_token_divergence(student_logits_N_V, teacher_logits_N_V, None, LossKnobs.from_config(loss))[0]


def sampled_token_divergence(student_logp_N: Tensor, teacher_logp_N: Tensor) -> Tensor:
    """Sampled-token reverse-KL surrogate: ``(log p_S(y) - log p_T(y)).detach() * log p_S(y)``.

    ``y`` is the token the student sampled. The value is a surrogate, not a divergence (to log
    a KL estimate, average ``student_logp - teacher_logp``); its gradient, (log p_S(y) - log p_T(y)) *
    grad log p_S(y), is a REINFORCE estimate whose expectation over y ~ p_S is the gradient of
    KL(p_S || p_T). Only reverse KL has such a one-token estimator.
    """
    return (student_logp_N - teacher_logp_N).detach() * student_logp_N


def token_nll(student_logits_N_V: Tensor, token_ids_N: Tensor) -> Tensor:
    """Negative log-likelihood ``-log p_S(y_n)`` of given tokens: [N, V], [N] -> [N].

    The supervised baselines' per-token loss (``objective=sft_self`` / ``sft_gold``): cross-entropy
    against a hard target, no teacher distribution and no temperature. Computed in float32 (float64
    if the logits are float64), whatever the input dtype.
    """
    if token_ids_N.shape != student_logits_N_V.shape[:-1]:
        raise ValueError(f"token ids {tuple(token_ids_N.shape)} do not match logits {tuple(student_logits_N_V.shape)}")
    logits_N_V = student_logits_N_V.to(_compute_dtype(student_logits_N_V))
    target_N = logits_N_V.gather(-1, token_ids_N.unsqueeze(-1).long()).squeeze(-1)
    return torch.logsumexp(logits_N_V, dim=-1) - target_N


def mix_logits(reference_logits: Tensor, current_logits: Tensor, mix: float) -> Tensor:
    """The trust-region teacher's logits: ``lerp(reference, current, mix)`` in float32.

    ``mix = 0`` is the reference (initial) model, ``mix = 1`` the current student (both on the crop).
    """
    return torch.lerp(reference_logits.float(), current_logits.float(), mix)


# --- token weights ------------------------------------------------------------------------------


def token_weights(
    mask_B_T: Tensor,
    mode: str = "token_mean",
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """The normaliser of the aggregation as per-token weights w_N (float64, valid tokens in row-major order).

    - ``"token_mean"``: ``w_n = 1 / num_tokens`` (default: the number of valid tokens here). Pass
      the *global* count over all micro-batches and processes and the micro-batch losses add up to
      the full-batch token mean (gradient accumulation).
    - ``"seq_mean"``: ``w_n = 1 / (len_b * num_seqs)`` for a token of row b with ``len_b`` valid
      tokens (default ``num_seqs``: the rows with at least one valid token; pass the global count).

    Counts below 1 count as 1. The one normaliser: :func:`aggregate` and the chunked / fused
    losses of :mod:`vopd.fused_loss` all weight with it.
    """
    valid = mask_B_T.bool()
    if mode == "token_mean":
        count = valid.sum() if num_tokens is None else num_tokens
        return (1.0 / _at_least_one(count, valid.device)).expand(int(valid.sum()))
    if mode == "seq_mean":
        if valid.dim() != 2:
            raise ValueError(f"mode='seq_mean' needs a [B, T] mask, got shape {tuple(valid.shape)}")
        tokens_B = valid.sum(-1)
        count = (tokens_B > 0).sum() if num_seqs is None else num_seqs
        lengths_N = tokens_B[:, None].expand_as(valid)[valid].double()
        return 1.0 / (lengths_N * _at_least_one(count, valid.device))
    raise ValueError(f"aggregation mode must be one of {AGGREGATIONS}, got {mode!r}")


def _at_least_one(count: float | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(count, dtype=torch.float64, device=device).clamp(min=1)


def rollout_correction(logp_old_N: Tensor, logp_rollout_N: Tensor, *, clip: float = 2.0) -> Tensor:
    """Sampler-mismatch weight ``min(exp(log pi_old - log pi_rollout), clip)``, detached.

    Corrects for a sampling engine whose probabilities differ from the trainer's. ``logp_old_N``
    must come from the trainer's own forward pass; passing the sampler's log-probs makes it 1.
    """
    if not clip > 0:
        raise ValueError(f"rollout-correction clip must be > 0, got {clip}")
    return (logp_old_N - logp_rollout_N).detach().exp().clamp(max=clip)


def corrected_weights(
    weights_N: Tensor, student_logp_N: Tensor, rollout_logp_N: Tensor | None, *, clip: float
) -> tuple[Tensor, Tensor | None]:
    """``(w_n * rollout_correction_n, rollout_correction)``; ``(w_n, None)`` when there is no sampler log-prob."""
    if rollout_logp_N is None:
        return weights_N, None
    correction_N = rollout_correction(student_logp_N, rollout_logp_N, clip=clip)
    return weights_N.to(correction_N.dtype) * correction_N, correction_N


def weighted_sum(per_token_N: Tensor, weights_N: Tensor) -> Tensor:
    """``sum_n w_n * loss_n`` in the loss dtype; the weights are constants (detached)."""
    return (per_token_N * weights_N.detach().to(per_token_N.dtype)).sum()


# --- aggregation --------------------------------------------------------------------------------


def aggregate(
    per_token_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    mode: str = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar over the valid (mask != 0) tokens: the weighted sum with
    :func:`token_weights` (``"token_mean"`` or ``"seq_mean"``; counts as there).

    Masked entries are never read (NaN or garbage there does not leak into the value); a batch
    with no valid token gives 0.
    """
    if per_token_B_T.shape != mask_B_T.shape:
        raise ValueError(
            f"per-token loss {tuple(per_token_B_T.shape)} and mask {tuple(mask_B_T.shape)} differ in shape"
        )
    if mode == "seq_mean" and per_token_B_T.dim() != 2:
        raise ValueError(f"mode='seq_mean' needs a [B, T] per-token loss, got shape {tuple(per_token_B_T.shape)}")
    weights_N = token_weights(mask_B_T, mode, num_tokens=num_tokens, num_seqs=num_seqs)
    return weighted_sum(per_token_B_T[mask_B_T.bool()], weights_N)
