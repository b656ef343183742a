"""Independent references the tests compare the library against (written from the definitions)."""

from __future__ import annotations

import torch

from vopd.models import append_responses, repeat_prompts, response_logits


def teacher_forced_logp(
    model, batch, rollouts, blocked, *, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """Log-probs [B, T] of the sampled tokens under the distribution they were sampled from.

    A full forward on prompt + response in float64, blocked ids set to -inf, then temperature,
    then top-p (a token is kept while the mass strictly before it is below ``top_p``).
    """
    T = rollouts.response_ids_B_T.shape[1]
    n = rollouts.response_ids_B_T.shape[0] // batch["input_ids"].shape[0]
    inputs = append_responses(repeat_prompts(batch, n), rollouts.response_ids_B_T, rollouts.mask_B_T)
    with torch.no_grad():
        logits = response_logits(model, inputs, T).double()
    logits[..., blocked] = float("-inf")
    logits = logits / temperature
    if top_p < 1.0:
        sorted_p, order = logits.softmax(-1).sort(-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits.log_softmax(-1).gather(2, rollouts.response_ids_B_T[..., None]).squeeze(-1)
