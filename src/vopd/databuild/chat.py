"""Who answers the writer's and the filter's prompts: an OpenAI-compatible server or a local HF model.

Both take a list of images and one text and return ``n`` sampled replies. The server client
sends the images inline as PNG data URLs and asks for ``n`` choices in one request; a server
that ignores ``n`` (returns fewer) is asked again until ``n`` replies are in. Requests retry
(:func:`vopd.evaluation.backends.chat_choices`); one that still fails raises
:class:`~vopd.evaluation.backends.BackendError`, and the caller counts its item as dropped.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from PIL import Image

from vopd.databuild.settings import ChatConfig
from vopd.evaluation.backends import chat_choices, image_data_url

__all__ = ["ChatClient", "LocalSampler", "Sampler"]


class Sampler(Protocol):
    """Anything that answers ``text`` about ``images`` ``n`` times."""

    def ask(
        self, images: list[Image.Image], text: str, *, n: int, temperature: float, max_tokens: int
    ) -> list[str]: ...


class ChatClient:
    """Chat completions from an OpenAI-compatible server (key from the environment variable ``cfg.api_key_env``)."""

    def __init__(self, cfg: ChatConfig):
        self.cfg = cfg
        self.api_key = os.environ.get(cfg.api_key_env) or None

    def body(self, images: list[Image.Image], text: str, *, n: int, temperature: float, max_tokens: int) -> dict:
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images
        ]
        content.append({"type": "text", "text": text})
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if self.cfg.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.cfg.thinking}
        if n > 1:
            body["n"] = n
        return body

    def ask(self, images: list[Image.Image], text: str, *, n: int, temperature: float, max_tokens: int) -> list[str]:
        replies: list[str] = []
        while len(replies) < n:
            body = self.body(images, text, n=n - len(replies), temperature=temperature, max_tokens=max_tokens)
            replies += chat_choices(
                self.cfg.url,
                body,
                api_key=self.api_key,
                timeout_s=self.cfg.timeout_s,
                retries=self.cfg.retries,
                backoff_s=self.cfg.backoff_s,
            )
        return replies[:n]


class LocalSampler:
    """Sampled replies from a local model (``vopd.specs`` spec or folder), with the trainer's sampler.

    Only the first image is used (the filter shows one). Not thread-safe: call it from one thread.
    Deterministic for a given ``seed`` and call order.
    """

    def __init__(self, spec: str, *, seed: int = 0, thinking: bool | None = None):
        import torch

        from vopd.rollout import HFGenerateEngine
        from vopd.specs import resolve_model_spec

        self.model, self.processor = resolve_model_spec(spec)
        self.model.eval()
        self.engine = HFGenerateEngine(self.processor)
        self.thinking = thinking
        torch.manual_seed(seed)

    def ask(self, images: list[Image.Image], text: str, *, n: int, temperature: float, max_tokens: int) -> list[str]:
        from vopd.config import RolloutConfig
        from vopd.models import build_prompts

        batch = build_prompts(self.processor, images[:1], [text], thinking=self.thinking)
        rollouts = self.engine.sample(
            self.model, batch, RolloutConfig(n=n, temperature=temperature, max_new_tokens=max_tokens)
        )
        tok = getattr(self.processor, "tokenizer", self.processor)
        rows = [ids[mask].tolist() for ids, mask in zip(rollouts.response_ids_B_T, rollouts.mask_B_T)]
        return [t.strip() for t in tok.batch_decode(rows, skip_special_tokens=True)]
