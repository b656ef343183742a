"""A rollout engine whose answers are scripted: tests of code that reads a model's answers."""

from __future__ import annotations

import torch

from vopd.rollout import Rollouts


class ScriptedEngine:
    """Answers each prompt row with the next scripted text (greedy, log-prob -0.25 per token).

    ``prompts`` collects the decoded prompt rows it was asked; ``calls`` counts the batches.
    """

    def __init__(self, processor, answers):
        self.tok, self.answers, self.prompts, self.calls = processor.tokenizer, list(answers), [], 0

    def sample(self, model, batch, cfg):
        assert cfg.temperature == 0.0 and cfg.n == 1
        self.calls += 1
        self.prompts += self.tok.batch_decode(batch["input_ids"])
        end = self.tok.convert_tokens_to_ids("<|im_end|>")
        rows = [self.tok.encode(self.answers.pop(0)) + [end] for _ in range(batch["input_ids"].shape[0])]
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[j < len(r) for j in range(width)] for r in rows])
        return Rollouts(ids, mask, torch.where(mask, -0.25, 0.0), torch.arange(len(rows)))
