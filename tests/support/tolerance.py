"""Tolerances for comparing two float32 code paths that compute the same quantity in another order.

Two evaluations of one sum of ``n`` terms in different orders (chunked vs whole, a KV cache vs the
full prompt, fused vs reference, another CPU's SIMD width: ``ATEN_CPU_CAPABILITY``) differ by at
most ``(n - 1) * u * sum|x_i|`` (Higham, Accuracy and Stability of Numerical Algorithms, 2002,
section 4.2), ``u = 2**-24`` the unit roundoff of float32; with rounding errors of random sign the
typical difference is ``sqrt(n) * u * sum|x_i|``. So a tolerance is set by the *scale of the terms*
and the *length of the reductions*, not by the size of the result: a divergence of 1.8e-6 made of
log-probabilities of size 6 cannot be compared at a relative 1e-4 (that is 3e-4 ulps of its terms).

A model's logits pass through a chain of reductions (per layer: attention over the sequence, the
projections over the hidden and intermediate sizes; then the output head over the hidden size).
`logit_error` sums ``sqrt(n) * u`` over that chain: the relative disagreement to expect between
two orderings, times the scale of the terms it multiplies. Bit-exact comparisons stay only where
the same kernels run in the same order on one machine (e.g. resume 2 + 2 steps == 4 steps).
"""

from __future__ import annotations

import math

#: Unit roundoff of float32 (half its machine epsilon, 2**-23).
U32 = 2.0**-24


def reduction_chain(*lengths: int) -> float:
    """``sum(sqrt(n))`` over a chain of reductions of the given lengths (the random-walk growth of
    rounding error through sums computed one after another)."""
    return sum(math.sqrt(max(n, 1)) for n in lengths)


def logit_error(
    *, layers: int, hidden: int, intermediate: int, sequence: int, term_scale: float, safety: float = 4.0
) -> float:
    """Bound on how far two float32 orderings of a decoder's forward put one log-probability.

    Each layer reduces over the sequence (attention), the hidden size (projections) and the
    intermediate size (MLP); the head reduces over the hidden size. ``term_scale`` is the size of
    the terms compared (e.g. ``log(vocab)`` for the log-probabilities of a near-uniform tiny model);
    ``safety`` covers the constant of the random-walk estimate (a few standard deviations).
    """
    chain = layers * reduction_chain(sequence, hidden, intermediate) + reduction_chain(hidden)
    return safety * chain * U32 * term_scale


def divergence_atol(divergence: float, logp_error: float) -> float:
    """Bound on the change of a divergence D(P, Q) between two orderings that move each log-prob by
    at most ``logp_error``.

    To first order the perturbation of log-softmax averages to zero under its own distribution,
    so only ``sum_k (P_k - Q_k) * dz_k`` is left: at most ``2 * TV(P, Q) * logp_error``. For the
    Jensen-Shannon family (beta in [0, 1]) and KL, ``TV <= sqrt(8 * D)`` (Pinsker-type bounds,
    nats), hence ``2 * sqrt(8 D) * logp_error``: the error shrinks with sqrt(D), not with D, which is
    why a relative tolerance on a small divergence fails on another CPU.
    """
    return 2.0 * math.sqrt(8.0 * max(divergence, 0.0)) * logp_error
