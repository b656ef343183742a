"""On-policy rollouts: the student samples n responses per prompt.

`RolloutEngine` is the interface (a Protocol) any sampler implements; `HFGenerateEngine` is the
reference implementation on `model.generate`. The sampling distribution is fully controlled
here, not by the checkpoint's generation_config (whose temperature / top_k / top_p /
repetition_penalty defaults are neutralised): at each step the logits go through

    BlockTokens (vision / special ids -> -inf)  ->  temperature  ->  top-p

and the next token is drawn from the softmax of the result. `Rollouts.sampler_logp_B_T` holds the
log-probability of each sampled token under exactly that distribution (the "pi_sampler" of
docs/method.md, "Importance weights"), recorded step by step without keeping [T, B, V] scores in memory.

Prefill sharing: `generate(num_return_sequences=n)` copies every prompt n times before the first
forward, so the image is encoded and the (long) prompt decoded n times. For the families in
`vopd.scoring.PREFIX_FAMILIES` (the one family table, shared with scoring) the engine instead
runs each prompt once (`vopd.scoring.prefill_prompts`), expands its key/value cache to the n
rows and continues with its own decode loop,
which mirrors `generate`'s sampling step for step (float32 logits, the same processors, one
`torch.multinomial` over the [B, V] probabilities per step, finished rows fed the pad id), so
with the same seed it draws the same tokens (tests/test_rollout_sharing.py). Other families, and
`share_prefill=False`, use `generate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from vopd.config import RolloutConfig
from vopd.models import backbone, output_head, vision_token_ids
from vopd.scoring import PREFIX_FAMILIES, prefill_prompts, text_positions

__all__ = [
    "Rollouts",
    "RolloutEngine",
    "HFGenerateEngine",
    "BlockTokens",
    "block_vision_tokens",
    "eos_token_ids",
    "reference_rollouts",
    "response_mask",
]

# End-of-turn / end-of-text tokens of the supported families; any present in the vocab stops a row.
_END_TOKEN_STRINGS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<end_of_utterance>", "<eos>")

# Generation knobs neutralised so a checkpoint's generation_config cannot change the sampler.
_NEUTRAL_GENERATION = {
    "top_k": 0,
    "top_p": 1.0,
    "temperature": 1.0,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
}


@dataclass
class Rollouts:
    """Sampled responses, one row per (prompt, sample), prompt-major (rows i*n..i*n+n-1 = prompt i).

    response_ids_B_T: token ids, padded with the pad id after the end of each response.
    mask_B_T: True for real response tokens, including the EOS that ended the response.
    sampler_logp_B_T: log-prob of each sampled token under the distribution actually sampled
        from (blocked ids, temperature, top-p applied); 0 where the mask is False. For greedy
        decoding: the log-prob under the blocked, temperature-1 distribution.
    prompt_index_B: prompt row of each response row.
    """

    response_ids_B_T: torch.Tensor
    mask_B_T: torch.Tensor
    sampler_logp_B_T: torch.Tensor
    prompt_index_B: torch.Tensor

    @property
    def lengths_B(self) -> torch.Tensor:
        """Number of real response tokens per row (EOS included)."""
        return self.mask_B_T.sum(dim=1)


class RolloutEngine(Protocol):
    """Anything that samples `cfg.n` responses per prompt row of a left-padded prompt batch.

    The trainer calls exactly these three methods.
    """

    def sample(
        self, model: PreTrainedModel, prompt_batch: Any, cfg: RolloutConfig, *, generator_seed: int | None = None
    ) -> Rollouts:
        """Sample responses; rows in prompt-major order."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """The engine's own metrics since the last call, logged with each step (may be empty)."""
        ...

    def close(self) -> None:
        """Release what the engine started (a server, a process); called once, after the last step."""
        ...


def reference_rollouts(processor: Any, answers: Sequence[str | None], *, n: int = 1) -> Rollouts:
    """The reference answers as responses (``objective=sft_gold``), ``n`` copies per prompt.

    Each row is the answer's tokens (no special tokens added) followed by the end of turn: the
    first of the chat end tokens (``<|im_end|>`` ...) in the vocabulary, else the tokenizer's EOS,
    the token a sampled response ends with. ``sampler_logp_B_T`` is 0 (nothing was sampled).

    Raises:
        ValueError: an answer is missing (``None`` or empty).
    """
    if any(a is None or not str(a).strip() for a in answers):
        raise ValueError("reference_rollouts: every prompt needs a reference answer (objective=sft_gold)")
    tok = getattr(processor, "tokenizer", processor)
    vocab = tok.get_vocab()
    end = next((vocab[s] for s in _END_TOKEN_STRINGS if s in vocab), tok.eos_token_id)
    if end is None:
        raise ValueError("no end-of-turn or EOS token in the tokenizer to end the reference answers with")
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    rows = [tok(str(a).strip(), add_special_tokens=False)["input_ids"] + [end] for a in answers]
    width = max(len(r) for r in rows)
    ids_B_T = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_B_T = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids_B_T[i, : len(row)] = torch.tensor(row)
        mask_B_T[i, : len(row)] = True
    ids_B_T, mask_B_T = ids_B_T.repeat_interleave(n, dim=0), mask_B_T.repeat_interleave(n, dim=0)
    return Rollouts(ids_B_T, mask_B_T, torch.zeros(ids_B_T.shape), torch.arange(len(rows)).repeat_interleave(n))


class BlockTokens(LogitsProcessor):
    """Set the logits of `ids` to -inf so they are never sampled (ids >= vocab width are ignored)."""

    def __init__(self, ids: Iterable[int]):
        self.ids = sorted({int(i) for i in ids})

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = [i for i in self.ids if i < scores.shape[-1]]
        if ids:
            scores = scores.clone()
            scores[:, ids] = float("-inf")
        return scores


def block_vision_tokens(processor: Any, model: PreTrainedModel | None = None) -> BlockTokens:
    """A `BlockTokens` for every vision special token of this processor (and model config)."""
    return BlockTokens(vision_token_ids(processor, model))


def eos_token_ids(processor: Any = None, model: PreTrainedModel | None = None) -> list[int]:
    """All ids that end a response: generation config + tokenizer EOS + end-of-turn tokens in the vocab."""
    ids: set[int] = set()
    if model is not None:
        ids.update(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    tok = getattr(processor, "tokenizer", processor)
    if tok is not None:
        ids.update(_as_list(getattr(tok, "eos_token_id", None)))
        vocab = tok.get_vocab()
        ids.update(vocab[s] for s in _END_TOKEN_STRINGS if s in vocab)
    if not ids:
        raise ValueError("no EOS token id found in the tokenizer or the model's generation_config")
    return sorted(ids)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def response_mask(response_ids_B_T: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """True up to and including the first EOS of each row, False after it."""
    is_eos = torch.isin(response_ids_B_T, torch.tensor(list(eos_ids), device=response_ids_B_T.device))
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # EOS strictly before t
    return eos_before == 0


class _SampledLogProbs(LogitsProcessor):
    """Last in the processor list: records log p(sampled token) of the final sampling distribution.

    At step s it sees the token sampled at step s-1 (the last column of input_ids) and gathers its
    score from step s-1 minus that step's log-sum-exp; `finish` handles the final step. Only a
    reference to one step's scores and a [B] log-sum-exp are kept (no [B, V] copy).
    """

    def __init__(self) -> None:
        self.logp_steps: list[torch.Tensor] = []
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None

    def _gather_prev(self, tokens: torch.Tensor) -> None:
        if self._prev is not None:
            scores, lse = self._prev
            self.logp_steps.append(scores.gather(1, tokens[:, None]).squeeze(1).float() - lse)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._gather_prev(input_ids[:, -1])
        self._prev = (scores, torch.logsumexp(scores.float(), dim=-1))
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._gather_prev(last_tokens)
        self._prev = None
        return torch.stack(self.logp_steps, dim=1)


class HFGenerateEngine:
    """Rollouts with the model's KV cache: one prefill per prompt shared by its n samples
    (`vopd.scoring.PREFIX_FAMILIES`), else `model.generate` with `num_return_sequences=n`.

    Args:
        processor_or_blocked_ids: the processor (vision token ids and EOS ids are read from it)
            or an explicit iterable of token ids to block.
        eos_ids: ids that end a response (default: `eos_token_ids(processor, model)`).
        pad_token_id: pad id for finished rows (default: the tokenizer's / generation config's).
        share_prefill: run each prompt's prefill once for its n samples where the family is
            verified; False always uses `generate` (the straightforward path, `naive=true`).
    """

    def __init__(
        self,
        processor_or_blocked_ids: Any,
        *,
        eos_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        share_prefill: bool = True,
    ) -> None:
        if hasattr(processor_or_blocked_ids, "tokenizer") or hasattr(processor_or_blocked_ids, "get_vocab"):
            self.processor = processor_or_blocked_ids
            self.blocked_ids = vision_token_ids(self.processor)
        else:
            self.processor = None
            self.blocked_ids = sorted({int(i) for i in processor_or_blocked_ids})
        self.eos_ids = list(eos_ids) if eos_ids is not None else None
        self.pad_token_id = pad_token_id
        self.share_prefill = share_prefill

    def _eos_and_pad(self, model: PreTrainedModel) -> tuple[list[int], int]:
        eos = self.eos_ids if self.eos_ids is not None else eos_token_ids(self.processor, model)
        pad = self.pad_token_id
        if pad is None:
            tok = getattr(self.processor, "tokenizer", self.processor)
            pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        return eos, eos[0] if pad is None else int(pad)

    def step_metrics(self) -> dict[str, float]:
        """None: sampling runs inside the step, timed as its ``time_sample``."""
        return {}

    def close(self) -> None:
        """Nothing to release: the engine runs in this process."""

    def sample(
        self, model: PreTrainedModel, prompt_batch: Any, cfg: RolloutConfig, *, generator_seed: int | None = None
    ) -> Rollouts:
        """Sample `cfg.n` responses per prompt row (prompt-major); deterministic given the torch seed."""
        eos, pad = self._eos_and_pad(model)
        greedy = cfg.temperature == 0
        blocked = self.blocked_ids if self.processor is None else vision_token_ids(self.processor, model)
        processors: list[LogitsProcessor] = [BlockTokens(blocked)]
        if not greedy and cfg.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(cfg.temperature))
        if not greedy and cfg.top_p < 1.0:
            processors.append(TopPLogitsWarper(cfg.top_p))
        recorder = _SampledLogProbs()
        processors.append(recorder)

        num_prompts = prompt_batch["input_ids"].shape[0]
        prompt_len = prompt_batch["input_ids"].shape[1]
        device = getattr(model, "device", None)
        inputs = {
            k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v)
            for k, v in prompt_batch.items()
        }
        # Sampling knobs are meaningless (and warned about) for greedy decoding: neutralise them only when sampling.
        neutral = (
            _NEUTRAL_GENERATION
            if not greedy
            else {
                k: v
                for k, v in _NEUTRAL_GENERATION.items()
                if k in ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens")
            }
        )
        generate_kwargs = dict(
            **neutral,
            do_sample=not greedy,
            num_beams=1,
            # Greedy rows of one prompt are identical: decode once and repeat below.
            num_return_sequences=1 if greedy else cfg.n,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList(processors),
            return_dict_in_generate=False,
            use_cache=True,
        )
        shared = self.share_prefill and getattr(model.config, "model_type", None) in PREFIX_FAMILIES
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _seeded(generator_seed, device):
                if shared:
                    response = _decode_from_shared_prefill(
                        model,
                        inputs,
                        LogitsProcessorList(processors),
                        n=1 if greedy else cfg.n,
                        max_new_tokens=cfg.max_new_tokens,
                        eos_ids=eos,
                        pad_id=pad,
                        greedy=greedy,
                    )
                else:
                    response = model.generate(**inputs, **generate_kwargs)[:, prompt_len:]
        finally:
            model.train(was_training)

        logp = recorder.finish(response[:, -1])
        if greedy and cfg.n > 1:
            response, logp = response.repeat_interleave(cfg.n, dim=0), logp.repeat_interleave(cfg.n, dim=0)
        mask = response_mask(response, eos)
        response = response.masked_fill(~mask, pad)
        return Rollouts(
            response_ids_B_T=response,
            mask_B_T=mask,
            sampler_logp_B_T=logp.masked_fill(~mask, 0.0),
            prompt_index_B=torch.arange(num_prompts, device=response.device).repeat_interleave(cfg.n),
        )


@torch.no_grad()
def _decode_from_shared_prefill(
    model: PreTrainedModel,
    prompts: dict[str, Any],
    processors: LogitsProcessorList,
    *,
    n: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    greedy: bool,
) -> torch.Tensor:
    """Response ids [P*n, T]: prefill the P prompts once, expand the cache to P*n rows, decode.

    Each step is `generate`'s sampling step: float32 logits of the last position -> processors ->
    softmax -> one `torch.multinomial` draw per row (argmax when greedy); rows that have emitted an
    EOS get the pad id; stop when every row is done or after `max_new_tokens`. Prefill and M-RoPE
    positions are `vopd.scoring`'s: the prompt's from the model's own rule, then max + 1, + 2, ...
    on all three axes for the generated tokens.
    """
    base, head = backbone(model), output_head(model)
    ids_P_L, mask_P_L = prompts["input_ids"], prompts["attention_mask"]
    prefill = prefill_prompts(base, prompts)
    logits_B_V = head(prefill.hidden_P_L_H[:, -1]).float().repeat_interleave(n, dim=0)
    prefill.hidden_P_L_H = None  # free the prompt's hidden states before decoding
    next_pos_B, cache = prefill.repeat(n), prefill.cache
    mask_B_S = mask_P_L.repeat_interleave(n, dim=0)
    seq_B_S = ids_P_L.repeat_interleave(n, dim=0)  # what generate hands the processors
    eos = torch.tensor(list(eos_ids), device=ids_P_L.device)
    unfinished_B = torch.ones(seq_B_S.shape[0], dtype=torch.long, device=ids_P_L.device)
    start = seq_B_S.shape[1]
    for step in range(max_new_tokens):
        scores_B_V = processors(seq_B_S, logits_B_V)
        if greedy:
            next_B = scores_B_V.argmax(dim=-1)
        else:
            next_B = torch.multinomial(torch.softmax(scores_B_V, dim=-1), num_samples=1).squeeze(1)
        next_B = next_B * unfinished_B + pad_id * (1 - unfinished_B)
        seq_B_S = torch.cat([seq_B_S, next_B[:, None]], dim=1)
        unfinished_B = unfinished_B & ~torch.isin(next_B, eos)
        if step + 1 == max_new_tokens or unfinished_B.max() == 0:
            break
        mask_B_S = torch.cat([mask_B_S, mask_B_S.new_ones(mask_B_S.shape[0], 1)], dim=1)
        out = base(
            input_ids=next_B[:, None],
            attention_mask=mask_B_S,
            position_ids=text_positions(next_pos_B, step, 1),
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        cache = getattr(out, "cache", None) or cache
        logits_B_V = head(out.last_hidden_state[:, -1]).float()
    return seq_B_S[:, start:]


class _seeded:
    """Context manager: if `seed` is given, sample under it without disturbing the global RNG."""

    def __init__(self, seed: int | None, device: Any) -> None:
        self.seed = seed
        self.devices = [device] if device is not None and torch.device(device).type == "cuda" else []
        self._fork = None

    def __enter__(self) -> None:
        if self.seed is not None:
            self._fork = torch.random.fork_rng(devices=self.devices)
            self._fork.__enter__()
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc)
