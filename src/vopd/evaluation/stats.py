"""Paired statistics for comparing two views (or two models) on the same questions.

Both tests use only the paired outcomes: ``a[i]`` and ``b[i]`` are whether question ``i`` was
answered correctly under view A and view B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedTable", "mcnemar_exact", "paired_bootstrap_ci", "paired_table", "wilson_interval"]


@dataclass(frozen=True)
class PairedTable:
    """The 2x2 table of paired outcomes (A = first view, B = second view)."""

    both_right: int
    only_a_right: int
    only_b_right: int
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_right + self.only_a_right + self.only_b_right + self.both_wrong


def _as_bool(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=bool)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of booleans, got shape {arr.shape}")
    return arr


def paired_table(a: object, b: object) -> PairedTable:
    """Count both right / only A right / only B right / both wrong."""
    a_N, b_N = _as_bool(a, "a"), _as_bool(b, "b")
    if a_N.shape != b_N.shape:
        raise ValueError(f"paired outcomes differ in length: {a_N.size} vs {b_N.size}")
    return PairedTable(
        both_right=int(np.sum(a_N & b_N)),
        only_a_right=int(np.sum(a_N & ~b_N)),
        only_b_right=int(np.sum(~a_N & b_N)),
        both_wrong=int(np.sum(~a_N & ~b_N)),
    )


def mcnemar_exact(only_a_right: int, only_b_right: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    Under the null each discordant pair is equally likely to favour A or B, so the smaller
    count is Binomial(n, 1/2): p = min(1, 2 * P(X <= min)). No discordant pairs gives 1.
    """
    n = only_a_right + only_b_right
    if n == 0:
        return 1.0
    k = min(only_a_right, only_b_right)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap_ci(
    a: object, b: object, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Difference ``mean(b) - mean(a)`` with a percentile bootstrap interval over questions.

    Questions are resampled with replacement, keeping each question's two outcomes together
    (the pairing is what makes the interval tight). Returns ``(diff, low, high)``.
    """
    a_N, b_N = _as_bool(a, "a"), _as_bool(b, "b")
    if a_N.shape != b_N.shape:
        raise ValueError(f"paired outcomes differ in length: {a_N.size} vs {b_N.size}")
    if a_N.size == 0:
        return (math.nan, math.nan, math.nan)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d_N = b_N.astype(np.float64) - a_N.astype(np.float64)
    rng = np.random.default_rng(seed)
    # Resample in chunks so 10k x 20k questions never needs one giant index array.
    means, chunk = [], max(1, 2_000_000 // d_N.size)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, d_N.size, size=(min(chunk, n_boot - start), d_N.size))
        means.append(d_N[idx].mean(axis=1))
    boot = np.concatenate(means)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(d_N.mean()), float(low), float(high)


def wilson_interval(correct: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for one accuracy (better than the normal one near 0 or 1)."""
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2.0))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
