"""The Vision-OPD loss: per-token divergences between the student and the crop teacher.

The student p_S sees the full image, the teacher p_T the evidence crop; both score the same
response tokens. At every response position we compare their next-token distributions with the
generalized Jensen-Shannon divergence (METHOD.md section 2.1)

    m       = beta * p_T + (1 - beta) * p_S
    JSD_b   = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

with beta = 0 meaning forward KL(p_T || p_S) and beta = 1 reverse KL(p_S || p_T). (The mixture
formula itself goes to 0 at both ends, so the two ends are special-cased, not limits of it.)

The distributions are compared on a *support* of categories (section 2.2): the full vocabulary,
or the student's top-k ids plus one tail category holding the rest of the mass. Everything here is
a small pure function on tensors; the teacher is always a stop-gradient target.

Axis suffixes: B rows, T response tokens, V vocabulary, K support size, N flattened valid tokens,
H hidden size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

SUPPORTS = ("student", "teacher", "union")
ESTIMATORS = ("topk", "full", "sampled")


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
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
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


# --- support selection --------------------------------------------------------------------------


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


def _check_knobs(*, beta: float, top_k: int | None, temperature: float, support: str) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None (full vocabulary), got {top_k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")


# --- per-token divergence -----------------------------------------------------------------------


def _per_token(
    student_logits_N_V: Tensor,
    teacher_logits_N_V: Tensor,
    token_ids_N: Tensor | None,
    *,
    estimator: str,
    beta: float,
    top_k: int | None,
    add_tail: bool,
    temperature: float,
    support: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss and detached per-token stats; the single place the loss is assembled."""
    if student_logits_N_V.shape != teacher_logits_N_V.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_N_V.shape)} and teacher logits {tuple(teacher_logits_N_V.shape)} "
            "must have the same shape (same response positions, same vocabulary)"
        )
    dtype = _compute_dtype(student_logits_N_V, teacher_logits_N_V)
    student = _scale(student_logits_N_V.to(dtype), temperature)
    teacher = _scale(teacher_logits_N_V.detach().to(dtype), temperature)  # stop-gradient target
    student_log_z = torch.logsumexp(student, dim=-1, keepdim=True)
    teacher_log_z = torch.logsumexp(teacher, dim=-1, keepdim=True)

    stats: dict[str, Tensor] = {}
    if token_ids_N is not None:
        ids_N_1 = token_ids_N.unsqueeze(-1).long()
        student_token_logp = _gather_logp(student, student_log_z, ids_N_1, None).squeeze(-1)
        teacher_token_logp = _gather_logp(teacher, teacher_log_z, ids_N_1, None).squeeze(-1)
        stats["student_logp_N"] = student_token_logp.detach()
        stats["teacher_logp_N"] = teacher_token_logp
    if estimator == "sampled":
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

    ids_N_K, drop_N_K = _support_ids(student, teacher, top_k, support)
    student_logp_N_K = _gather_logp(student, student_log_z, ids_N_K, drop_N_K)
    teacher_logp_N_K = _gather_logp(teacher, teacher_log_z, ids_N_K, drop_N_K)
    stats["tail_mass_N"] = _outside_mass(student_logp_N_K.detach())
    stats["teacher_tail_mass_N"] = _outside_mass(teacher_logp_N_K)
    close = add_tail_bucket if add_tail else _renormalise
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
    _check_knobs(beta=beta, top_k=top_k, temperature=temperature, support=support)
    loss_N, _ = _per_token(
        student_logits_N_V, teacher_logits_N_V, None,
        estimator="topk", beta=beta, top_k=top_k, add_tail=add_tail, temperature=temperature, support=support,
    )
    return loss_N


def sampled_token_divergence(student_logp_N: Tensor, teacher_logp_N: Tensor) -> Tensor:
    """Sampled-token reverse-KL surrogate: ``(log p_S(y) - log p_T(y)).detach() * log p_S(y)``.

    ``y`` is the token the student sampled. The value is a surrogate, not a divergence (to log
    a KL estimate, average ``student_logp - teacher_logp``); its gradient, (log p_S(y) - log p_T(y)) *
    grad log p_S(y), is a REINFORCE estimate whose expectation over y ~ p_S is the gradient of
    KL(p_S || p_T). Only reverse KL has such a one-token estimator.
    """
    return (student_logp_N - teacher_logp_N).detach() * student_logp_N


# --- importance weights -------------------------------------------------------------------------


def importance_weights(logp_new_N: Tensor, logp_old_N: Tensor, *, clip: float = 2.0) -> Tensor:
    """Distillation ratio ``min(exp(clamp(log pi_new - log pi_old, -20, 20)), clip)``, detached.

    Multiplies the per-token loss when a rollout batch is reused for several optimiser steps;
    exactly 1 when each batch is used once (pi_new == pi_old).
    """
    if not clip > 0:
        raise ValueError(f"importance-weight clip must be > 0, got {clip}")
    log_ratio = (logp_new_N - logp_old_N).detach().clamp(-20.0, 20.0)
    return log_ratio.exp().clamp(max=clip)


def rollout_correction(logp_old_N: Tensor, logp_rollout_N: Tensor, *, clip: float = 2.0) -> Tensor:
    """Sampler-mismatch weight ``min(exp(log pi_old - log pi_rollout), clip)``, detached.

    Corrects for a sampling engine whose probabilities differ from the trainer's. ``logp_old_N``
    must come from the trainer's own forward pass; passing the sampler's log-probs makes it 1.
    """
    if not clip > 0:
        raise ValueError(f"rollout-correction clip must be > 0, got {clip}")
    return (logp_old_N - logp_rollout_N).detach().exp().clamp(max=clip)


# --- reduction ----------------------------------------------------------------------------------


def aggregate(
    per_token_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    mode: str = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar over the valid (mask != 0) tokens.

    - ``"token_mean"``: sum of valid per-token losses / ``num_tokens`` (default: the number of
      valid tokens here). Pass the *global* count over all micro-batches and processes and the
      micro-batch losses add up to the full-batch token mean (gradient accumulation).
    - ``"seq_mean"``: each row's mean over its valid tokens, summed and divided by ``num_seqs``
      (default: the number of rows with at least one valid token; pass the global count likewise).

    Masked entries are never read (NaN or garbage there does not leak into the value); a batch
    with no valid token gives 0.
    """
    if per_token_B_T.shape != mask_B_T.shape:
        raise ValueError(
            f"per-token loss {tuple(per_token_B_T.shape)} and mask {tuple(mask_B_T.shape)} differ in shape"
        )
    valid = mask_B_T.bool()
    masked = torch.where(valid, per_token_B_T, torch.zeros((), dtype=per_token_B_T.dtype, device=per_token_B_T.device))
    if mode == "token_mean":
        count = valid.sum() if num_tokens is None else num_tokens
        return masked.sum() / torch.as_tensor(count, dtype=masked.dtype, device=masked.device).clamp(min=1)
    if mode == "seq_mean":
        if masked.dim() != 2:
            raise ValueError(f"mode='seq_mean' needs a [B, T] per-token loss, got shape {tuple(masked.shape)}")
        tokens_B = valid.sum(-1)
        seq_mean_B = masked.sum(-1) / tokens_B.clamp(min=1)
        count = (tokens_B > 0).sum() if num_seqs is None else num_seqs
        return seq_mean_B.sum() / torch.as_tensor(count, dtype=masked.dtype, device=masked.device).clamp(min=1)
    raise ValueError(f"aggregate mode must be 'token_mean' or 'seq_mean', got {mode!r}")


# --- memory-bounded driver ----------------------------------------------------------------------


def chunked_token_divergence(
    student_hidden_N_H: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_logits_fn: Callable[[slice], Tensor],
    *,
    chunk_size: int = 1024,
    estimator: str = "topk",
    token_ids_N: Tensor | None = None,
    **divergence_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss without ever holding [N, V] logits: chunks of ``chunk_size`` positions at a time.

    For each chunk, ``student_head(student_hidden_N_H[chunk])`` gives the student logits and
    ``teacher_logits_fn(chunk_slice)`` the teacher's (called under no_grad). Each chunk runs under
    ``torch.utils.checkpoint`` (non-reentrant), so only the chunk's hidden states are kept for the
    backward pass, which recomputes the chunk's logits (both ``student_head`` and
    ``teacher_logits_fn`` run again, so they must be deterministic). Same loss and gradients as the
    unchunked computation.

    ``estimator``:

    - ``"topk"``: :func:`token_divergence` on a top-k support (``top_k`` default 100);
    - ``"full"``: :func:`token_divergence` on the full vocabulary (do not pass ``top_k``);
    - ``"sampled"``: :func:`sampled_token_divergence` on ``token_ids_N`` (reverse KL only; ``beta``,
      if passed, must be 1; ``top_k``/``support``/``add_tail`` are rejected).

    ``divergence_kwargs`` are :func:`token_divergence`'s knobs (``beta``, ``top_k``, ``add_tail``,
    ``temperature``, ``support``). Returns ``(loss_N, stats)``; the stats are detached [N] tensors:
    ``tail_mass_N`` (student mass outside the support; 0 for full vocabulary and sampled),
    ``teacher_tail_mass_N`` (teacher mass outside it: a large value means k is too small), and, when
    ``token_ids_N`` is given, ``student_logp_N`` / ``teacher_logp_N`` of those tokens (for the
    importance weights and for metrics).
    """
    knobs = _estimator_knobs(estimator, divergence_kwargs)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num = student_hidden_N_H.shape[0]
    if token_ids_N is not None and token_ids_N.shape != (num,):
        raise ValueError(
            f"token_ids_N must have shape ({num},) to match student_hidden_N_H, got {tuple(token_ids_N.shape)}"
        )

    def chunk_loss(hidden_C_H: Tensor, rows: slice, ids_C: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_C_V = teacher_logits_fn(rows)
        return _per_token(student_head(hidden_C_H), teacher_C_V, ids_C, estimator=estimator, **knobs)

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


def _estimator_knobs(estimator: str, divergence_kwargs: dict) -> dict:
    """Resolve ``estimator`` + ``token_divergence`` kwargs into the full, checked knob set."""
    allowed = {"beta", "top_k", "add_tail", "temperature", "support"}
    unknown = set(divergence_kwargs) - allowed
    if unknown:
        raise TypeError(f"unknown divergence option(s) {sorted(unknown)}; expected some of {sorted(allowed)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    knobs = {"beta": 0.5, "top_k": 100, "add_tail": True, "temperature": 1.0, "support": "student"} | divergence_kwargs
    if estimator == "full":
        if divergence_kwargs.get("top_k") is not None:
            raise ValueError(f"estimator='full' uses the whole vocabulary; drop top_k={divergence_kwargs['top_k']}")
        knobs["top_k"] = None
    elif estimator == "topk" and knobs["top_k"] is None:
        raise ValueError("estimator='topk' needs a top_k; use estimator='full' for the whole vocabulary")
    elif estimator == "sampled":
        clash = sorted({"top_k", "add_tail", "support"} & set(divergence_kwargs))
        if clash:
            raise ValueError(f"estimator='sampled' uses the sampled token only; drop {clash}")
        if divergence_kwargs.get("beta", 1.0) != 1.0:
            beta = divergence_kwargs["beta"]
            raise ValueError(f"estimator='sampled' estimates reverse KL only (beta=1), got beta={beta}")
        knobs |= {"beta": 1.0, "top_k": None}
    _check_knobs(beta=knobs["beta"], top_k=knobs["top_k"], temperature=knobs["temperature"], support=knobs["support"])
    return knobs


# --- fused, memory-bounded loss and gradient ----------------------------------------------------

TokenWeights = Tensor | Callable[[slice, dict[str, Tensor]], Tensor]


def fused_chunked_divergence(
    student_hidden_N_H: Tensor,
    head_weight_V_H: Tensor,
    head_bias_V: Tensor | None,
    teacher_logits_fn: Callable[[slice], Tensor],
    token_weights_N: TokenWeights,
    *,
    chunk_size: int = 256,
    estimator: str = "topk",
    token_ids_N: Tensor | None = None,
    softcap: float | None = None,
    **divergence_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_n w_n * loss_n`` and its gradients in one pass over chunks, never holding [N, V] logits.

    The same loss as :func:`chunked_token_divergence` followed by a weighted sum (``aggregate`` is
    one: ``w_n = 1 / num_tokens`` for the token mean, ``1 / (len_b * num_seqs)`` for the sequence
    mean), for an output head that is a plain linear map ``logits = h W^T + b``, optionally soft-capped
    ``cap * tanh(logits / cap)``. Because the weights are known before the pass, the forward computes,
    chunk by chunk, the per-token loss *and* its gradient with respect to the chunk's logits, then
    turns that into the chunk's hidden-state gradient and adds the chunk's head gradient
    ``dL/dlogits^T h`` into one preallocated [V, H] buffer. Backward only scales the stored
    gradients by the incoming one. Compared with checkpointing every chunk this keeps one head
    gradient alive instead of two or three, and runs 3 head matmuls per chunk (logits, hidden
    gradient, weight gradient) plus the teacher's, instead of recomputing both heads in backward.

    ``token_weights_N`` is a [N] tensor, or a callable ``(rows, chunk_stats) -> w_C`` for weights
    that depend on the chunk's detached stats (e.g. a rollout correction from ``student_logp_N``).
    The weights are treated as constants (no gradient). Other arguments as in
    :func:`chunked_token_divergence`; ``teacher_logits_fn`` is called once per chunk, under
    no_grad. Returns ``(loss, stats)``: a scalar in the loss dtype (float32, or float64 for
    float64 inputs), and the detached [N] stats of :func:`chunked_token_divergence` plus
    ``weight_N`` (the weights used). Gradients reach ``student_hidden_N_H``, ``head_weight_V_H`` and
    ``head_bias_V``; it is not twice differentiable.
    """
    knobs = _estimator_knobs(estimator, divergence_kwargs)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num = student_hidden_N_H.shape[0]
    if num == 0:
        raise ValueError("fused_chunked_divergence got no tokens (student_hidden_N_H has N = 0)")
    if token_ids_N is not None and token_ids_N.shape != (num,):
        raise ValueError(
            f"token_ids_N must have shape ({num},) to match student_hidden_N_H, got {tuple(token_ids_N.shape)}"
        )
    if isinstance(token_weights_N, Tensor) and token_weights_N.shape != (num,):
        raise ValueError(f"token_weights_N must have shape ({num},), got {tuple(token_weights_N.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    tensors = (student_hidden_N_H, head_weight_V_H) + (() if head_bias_V is None else (head_bias_V,))
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    plan = _FusedPlan(teacher_logits_fn, token_weights_N, token_ids_N, chunk_size, estimator, knobs, softcap, want_grad)
    stats: dict[str, Tensor] = {}
    loss = _FusedDivergence.apply(plan, stats, student_hidden_N_H, head_weight_V_H, head_bias_V)
    return loss, stats


class _FusedPlan:
    """The non-tensor arguments of `_FusedDivergence` (autograd.Function.apply is positional)."""

    def __init__(self, teacher_logits_fn, weights, token_ids_N, chunk_size, estimator, knobs, softcap, want_grad):
        self.teacher_logits_fn, self.weights, self.token_ids_N = teacher_logits_fn, weights, token_ids_N
        self.chunk_size, self.estimator, self.knobs = chunk_size, estimator, knobs
        self.softcap, self.want_grad = softcap, want_grad


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
        for start in range(0, num, plan.chunk_size):
            rows = slice(start, min(start + plan.chunk_size, num))
            hidden_C_H = hidden_N_H[rows].detach()
            with torch.no_grad():
                teacher_C_V = plan.teacher_logits_fn(rows)
            with torch.enable_grad():
                raw_C_V = _chunk_logits(hidden_C_H, weight, bias).requires_grad_(plan.want_grad)
                logits_C_V = raw_C_V if plan.softcap is None else torch.tanh(raw_C_V / plan.softcap) * plan.softcap
                ids_C = None if plan.token_ids_N is None else plan.token_ids_N[rows]
                loss_C, stats_C = _per_token(logits_C_V, teacher_C_V, ids_C, estimator=plan.estimator, **plan.knobs)
                del teacher_C_V, logits_C_V  # the graph keeps what backward needs; free the rest first
                stats_C = {k: v.detach() for k, v in stats_C.items()}
                w = plan.weights
                w_C = (w(rows, stats_C) if callable(w) else w[rows]).detach().to(loss_C.dtype)
                if w_C.shape != loss_C.shape:  # a [1] or [C, 1] weight would broadcast silently
                    raise ValueError(f"token weights for rows {rows.start}:{rows.stop} have shape "
                                     f"{tuple(w_C.shape)}, expected {tuple(loss_C.shape)}")
                stats_C["weight_N"] = w_C
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
            raise RuntimeError("fused_chunked_divergence: backward runs once per loss (its gradient buffers are "
                               "handed to autograd); recompute the loss instead of using retain_graph=True")
        grads, ctx.grads = ctx.grads, None  # hand the buffers over (autograd may adopt them as .grad)
        if not bool(grad_out == 1):
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return None, None, *grads
