"""Running one real ``train_step`` in tests: fixed rollouts, and gradients kept instead of applied."""

from __future__ import annotations

from typing import Any

import torch

from vopd.trainer import train_step


def seeded_step(state: Any, batches: Any, seed: int = 11, *, capture: dict | None = None) -> dict[str, float]:
    """``train_step`` after seeding: the same rollouts for every call at the same weights.

    With ``capture``, the step stops before the optimiser (``update=False``): its gradients go to
    ``capture["grads"]`` (name -> tensor), ``.grad`` is cleared, and no weight changes.
    """
    torch.manual_seed(seed)
    if capture is None:
        return train_step(state, batches)
    metrics = train_step(state, batches, update=False)
    capture["grads"] = {k: p.grad.clone() for k, p in state.policy.named_parameters() if p.grad is not None}
    state.optimizer.zero_grad(set_to_none=True)
    return metrics
