"""Running one real ``train_step`` in tests: fixed rollouts, and gradients captured instead of applied."""

from __future__ import annotations

from typing import Any

import torch

import vopd.trainer as trainer_mod


def capture_grads(monkeypatch: Any, store: dict) -> None:
    """Replace the optimiser step: keep the gradients in ``store["grads"]``, change no weight."""

    def capture(st: Any, *, loss_value: Any) -> dict[str, float]:
        store["grads"] = {k: p.grad.clone() for k, p in st.policy.named_parameters() if p.grad is not None}
        st.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": 0.0, "lr": 0.0, "skipped": 0.0}

    monkeypatch.setattr(trainer_mod, "_optimizer_step", capture)


def seeded_step(state: Any, batches: Any, seed: int = 11) -> dict[str, float]:
    """``train_step`` after seeding: the same rollouts for every call at the same weights."""
    torch.manual_seed(seed)
    return trainer_mod.train_step(state, batches)
