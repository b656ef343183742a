"""Where answers come from: a local Hugging Face model, or any OpenAI-compatible server.

A backend maps a list of :class:`PromptItem` to a list of response strings, in order, with
greedy decoding. Backends that can fail per item (a server) raise :class:`PartialFailure`
carrying the answers they did get, so the runner keeps those and retries only the rest.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from vopd.evaluation.types import PromptItem

__all__ = [
    "Backend",
    "BackendConfig",
    "BackendError",
    "HFBackend",
    "OpenAIBackend",
    "PartialFailure",
    "chat_choices",
    "chat_completion",
    "check_env_name",
    "image_data_url",
    "make_backend",
    "redact",
]


@runtime_checkable
class Backend(Protocol):
    """Anything that answers prompts: ``generate(items) -> responses`` (same order)."""

    def generate(self, items: list[PromptItem]) -> list[str]: ...


class BackendError(RuntimeError):
    """A request failed after all retries; the message says which and why."""


class PartialFailure(BackendError):
    """Some items of a batch failed: ``results[i]`` is ``None`` for those, ``errors[i]`` says why."""

    def __init__(self, results: list[str | None], errors: list[str | None]):
        failed = sum(r is None for r in results)
        first = next(e for e in errors if e)
        super().__init__(f"{failed} of {len(results)} requests failed; first error: {first}")
        self.results = results
        self.errors = errors


@dataclass
class BackendConfig:
    """How to reach the model that answers.

    Attributes:
        kind: ``"hf"`` (a local Hugging Face model; ``model`` is a path or hub id) or
            ``"openai"`` (an OpenAI-compatible server such as vLLM; ``model`` is its model name).
        model: checkpoint path / hub id, or the served model name.
        url: server base URL for ``openai``, e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: name of the environment variable holding the API key (never the key).
        max_new_tokens: generation budget per answer.
        thinking: chat-template thinking mode (``None`` = the non-thinking default).
        batch_size: prompts per ``generate`` call for ``hf``; in flight per round for ``openai``.
        concurrency: parallel requests for ``openai``.
        timeout_s: hard wall-clock limit per request attempt for ``openai`` (connect + whole reply).
        retries: extra attempts per request for ``openai`` (exponential backoff).
        backoff_s: first retry delay for ``openai`` (doubles each retry).
        dtype: weights dtype for ``hf``.
        device: device for ``hf``.
    """

    kind: str = "hf"
    model: str = ""
    url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    max_new_tokens: int = 256
    thinking: bool | None = None
    batch_size: int = 8
    concurrency: int = 8
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 0.5
    dtype: str = "bfloat16"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "openai"):
            raise ValueError(f"backend kind must be 'hf' or 'openai', got {self.kind!r}")
        for name in ("max_new_tokens", "batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0 or self.timeout_s <= 0:
            raise ValueError(f"retries must be >= 0 and timeout_s > 0, got {self.retries}, {self.timeout_s}")
        check_env_name(self.api_key_env, "api_key_env")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_name(name: str, what: str) -> None:
    """Refuse anything but an environment variable's name (a pasted key would be logged).

    The value is not echoed: if it is a key, it must not reach the terminal or a log either.
    """
    if not _ENV_NAME.fullmatch(name or "") or len(name) > 128:
        raise ValueError(
            f"{what} must be the NAME of an environment variable (letters, digits, _), e.g. OPENAI_API_KEY; "
            "the value given is not a variable name (was a key pasted there? put it in the environment instead)"
        )


def image_data_url(image: Image.Image) -> str:
    """PNG-encode an image as a ``data:image/png;base64,...`` URL (lossless, any server reads it)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_KEYLIKE = re.compile(r"(?i)(bearer\s+)\S+|\bsk-[A-Za-z0-9_\-*.]{6,}")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret, bearer token and ``sk-...`` key replaced by ``***``.

    Error texts end up in ``predictions.jsonl`` and ``judge.jsonl``; a server that echoes the
    key in its error body (some do on HTTP 401) must not put it there.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub(lambda m: (m.group(1) or "") + "***", text)


def _post(endpoint: str, data: bytes, headers: dict[str, str], deadline_s: float) -> tuple[int, bytes]:
    """POST and read the whole reply within ``deadline_s`` seconds of wall-clock time, in total.

    A socket timeout alone bounds each read, not the request: a server trickling one byte
    every half second would never trip it. A timer shuts the socket down at the deadline, which
    ends any blocked read at once. Connects directly (HTTP proxies are not used).
    """
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"{endpoint}: expected an http(s) URL")
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=deadline_s)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    start = time.monotonic()
    expired = threading.Event()

    def _expire() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(deadline_s, _expire)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        if expired.is_set():  # the connect itself took the whole budget
            raise TimeoutError
        conn.request("POST", path or "/", body=data, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if expired.is_set():
            raise TimeoutError
        return response.status, body
    except (OSError, http.client.HTTPException) as err:
        if expired.is_set() or time.monotonic() - start >= deadline_s:
            raise TimeoutError(f"no complete reply within {deadline_s:g} s") from None
        raise err
    finally:
        timer.cancel()
        conn.close()


def chat_completion(
    url: str,
    body: dict[str, Any],
    *,
    api_key: str | None,
    timeout_s: float,
    retries: int,
    backoff_s: float = 0.5,
) -> str:
    """POST ``body`` to ``{url}/chat/completions`` and return the first choice's text.

    ``timeout_s`` is a hard wall-clock limit per attempt (connect, send and the whole reply).
    Retries on connection errors, timeouts, truncated or malformed replies, HTTP 429 and 5xx;
    other HTTP errors (4xx: a bad request will not improve) raise at once. Error messages never
    hold the key: the body of an auth error is dropped, other bodies are redacted.
    """
    return chat_choices(url, body, api_key=api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)[0]


def chat_choices(
    url: str,
    body: dict[str, Any],
    *,
    api_key: str | None,
    timeout_s: float,
    retries: int,
    backoff_s: float = 0.5,
) -> list[str]:
    """As :func:`chat_completion`, but every choice's text, in order (a body with ``"n": k``
    asks for k; a server that ignores ``n`` returns fewer, so callers count what they got)."""
    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode("utf-8")
    last = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            status, raw = _post(endpoint, data, headers, timeout_s)
        except (TimeoutError, OSError, http.client.HTTPException) as err:
            last = f"{endpoint}: {type(err).__name__}: {err}"
            continue
        if status >= 400:
            last = f"HTTP {status} from {endpoint}"
            if status in (401, 403):
                raise BackendError(f"{last} (not retried: check the API key variable)")
            if status != 429 and status < 500:
                detail = redact(raw[:300].decode("utf-8", "replace"), [api_key])
                raise BackendError(f"{last}: {detail!r} (not retried: fix the request)")
            continue
        try:
            choices = json.loads(raw.decode("utf-8"))["choices"]
            texts = [c["message"]["content"] for c in choices]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError("no choices, or a content that is not a string")
            return texts
        except (KeyError, IndexError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as err:
            last = f"{endpoint}: malformed reply ({type(err).__name__}: {err})"
    raise BackendError(redact(f"request failed after {retries + 1} attempts: {last}", [api_key]))


class OpenAIBackend:
    """Greedy chat completions from an OpenAI-compatible server, ``concurrency`` requests at a time.

    The image goes inline as a PNG data URL. The API key is read from the environment variable
    named by ``cfg.api_key_env`` (unset is fine for local servers). ``thinking`` is passed as
    ``chat_template_kwargs.enable_thinking`` (vLLM / SGLang).
    """

    def __init__(self, cfg: BackendConfig):
        if not cfg.model:
            raise ValueError("the openai backend needs the served model name: pass --model NAME (BackendConfig.model)")
        self.cfg = cfg
        self.api_key = os.environ.get(cfg.api_key_env) or None

    def _body(self, item: PromptItem) -> dict[str, Any]:
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(item.image)}},
            {"type": "text", "text": item.text},
        ]
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0.0,
            "max_tokens": self.cfg.max_new_tokens,
        }
        body["chat_template_kwargs"] = {"enable_thinking": bool(self.cfg.thinking)}
        return body

    def _one(self, item: PromptItem) -> tuple[str | None, str | None]:
        try:
            text = chat_completion(
                self.cfg.url,
                self._body(item),
                api_key=self.api_key,
                timeout_s=self.cfg.timeout_s,
                retries=self.cfg.retries,
                backoff_s=self.cfg.backoff_s,
            )
            return text, None
        except Exception as err:  # one item's failure (even an unexpected one) must not sink the batch
            return None, redact(f"item {item.id}: {type(err).__name__}: {err}", [self.api_key])

    def generate(self, items: list[PromptItem]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            pairs = list(pool.map(self._one, items))
        results = [r for r, _ in pairs]
        if any(r is None for r in results):
            raise PartialFailure(results, [e for _, e in pairs])
        return [r for r in results if r is not None]


class HFBackend:
    """Greedy batched generation with a local Hugging Face model (``vopd.models``).

    Vision special tokens are suppressed: a random or weak model that emitted an image pad
    token would break the next decoding step.
    """

    def __init__(self, model: Any, processor: Any, *, max_new_tokens: int = 256, thinking: bool | None = None):
        from vopd.models import vision_token_ids

        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.thinking = thinking
        self._suppress = vision_token_ids(processor, model)

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> HFBackend:
        import torch

        from vopd.specs import resolve_model_spec

        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = cfg.dtype if device != "cpu" else "float32"
        model, processor = resolve_model_spec(cfg.model, dtype=dtype)  # a path, hub id, toy-base or tiny:<family>
        model = model.to(device).eval()
        return cls(model, processor, max_new_tokens=cfg.max_new_tokens, thinking=cfg.thinking)

    def generate(self, items: list[PromptItem]) -> list[str]:
        import torch

        from vopd.models import build_prompts

        if not items:
            return []
        batch = build_prompts(self.processor, [i.image for i in items], [i.text for i in items], thinking=self.thinking)
        batch = batch.to(self.model.device)
        tok = getattr(self.processor, "tokenizer", self.processor)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                suppress_tokens=self._suppress or None,
                pad_token_id=pad_id,
            )
        new_B_T = out[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new_B_T, skip_special_tokens=True)]


def make_backend(cfg: BackendConfig) -> Backend:
    """Build the backend ``cfg.kind`` names."""
    if cfg.kind == "openai":
        return OpenAIBackend(cfg)
    if not cfg.model:
        raise ValueError(
            "no model to answer with: pass --model PATH_OR_HUB_ID (vopd gap: or --checkpoints) (BackendConfig.model)"
        )
    return HFBackend.from_config(cfg)
